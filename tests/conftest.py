"""Shared, session-scoped pieces of the offline world: the generated shapes10 data, a
randomly initialised tiny-shapes checkpoint, and a (briefly) pre-trained tiny teacher."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network: every download path must fail fast instead.
os.environ["CLIPDISTILL_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# As `clipdistill` itself sets it (cli.py): torch's threads sleep at a barrier instead of spinning, so
# that the tests' torch and the tiny teacher's pre-training beside them (`_teacher_in_background`)
# share the two cores without the crawl of benchmarks/bench_busy.md. Read when torch loads: here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Under pytest-xdist (`pytest -n 2`; `make test` runs without it) each worker computes on one thread,
# itself and in the processes it starts: two workers of two threads on two cores crawl.
# The machine's own temp folder, before the session moves TMPDIR under pytest's folder (mode 0700:
# a test that reads files as another user works here instead).
SYSTEM_TMP = tempfile.gettempdir()

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also run the tests marked long (students trained for many minutes: make test-long)")


def pytest_collection_modifyitems(config, items):
    """Long tests train a real student to convergence (each says how long it takes): they would
    double the suite, so they run on demand and say so when skipped. The tests that need the
    pre-trained tiny teacher run last, while it pre-trains in another process (`_teacher_in_background`)."""
    if not config.getoption("--long"):
        skip = pytest.mark.skip(reason="trains a student to convergence: run with --long (make test-long)")
        for item in items:
            if "long" in item.keywords:
                item.add_marker(skip)
    if not WORKER:
        items[:] = teacher_last(items)


# What the whole suite holds on disk at its peak (1.8 GB measured: runs, checkpoints, bundles; pytest
# removes each passed test's folder, pyproject.toml) with a margin. CI once ran out of disk mid-suite
# and 80 tests failed on "No space left on device": one line that says so comes first now.
DISK_NEEDED_GB = 2.5


def pytest_collection_finish(session):
    import shutil

    heavy = any({"trained_run", "trained_teacher_file"} & set(getattr(it, "fixturenames", ())) for it in session.items)
    where = Path(session.config.option.basetemp or tempfile.gettempdir())
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free / 2**30
    if heavy and free < DISK_NEEDED_GB:
        pytest.exit(f"{free:.1f} GB free in {where}; these tests write up to about {DISK_NEEDED_GB:g} GB there "
                    f"(runs, checkpoints, bundles): free some space, or run pytest --basetemp=DIR on a disk with "
                    f"room", returncode=3)


def _module_fixtures(item) -> set[str]:
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {}) or {}
    return {name for name, fd in defs.items() if fd and getattr(fd[-1], "scope", None) == "module"}


def teacher_last(items: list) -> list:
    """`items` with those that need the pre-trained teacher moved to the end, each group in its own
    order. A test that shares a module-scoped fixture with a moved test of its module moves with it,
    so that no module fixture is built twice."""
    late = {i for i, it in enumerate(items) if "trained_teacher_file" in getattr(it, "fixturenames", ())}
    while True:
        shared: dict[str, set[str]] = {}
        for i in late:
            shared.setdefault(items[i].nodeid.split("::")[0], set()).update(_module_fixtures(items[i]))
        more = {i for i, it in enumerate(items) if i not in late
                and _module_fixtures(it) & shared.get(it.nodeid.split("::")[0], set())}
        if not more:
            break
        late |= more
    return [it for i, it in enumerate(items) if i not in late] + [it for i, it in enumerate(items) if i in late]


@pytest.fixture(autouse=True)
def _library_logging():
    """`cli.main` run in-process sets up the command's logging (no propagation to the root
    logger); put the library's default back so that caplog sees records in later tests."""
    yield
    import logging

    logger = logging.getLogger("clipdistill")
    for h in list(logger.handlers):
        if getattr(h, "_clipdistill", False):
            logger.removeHandler(h)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def data_root(cache_dir) -> Path:
    return cache_dir / "data"


@pytest.fixture(scope="session")
def random_teacher_file(tmp_path_factory) -> Path:
    """A real tiny-shapes open_clip model with random weights, saved as a checkpoint file."""
    from clipdistill.teacher.tiny import save_random_tiny_teacher

    return save_random_tiny_teacher(tmp_path_factory.mktemp("weights") / "tiny-random.safetensors")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, check: bool = True,
            log: Path | None = None):
    """Run `python -m clipdistill ARGS` in a real subprocess, as a user would. With `log`, its
    output goes to that file, as `clipdistill ARGS > LOG 2>&1` (proc.stdout is then None, and
    proc.stderr the file's text)."""
    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "clipdistill", *args]
    if log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    else:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout)
        proc.stderr = Path(log).read_bytes().decode("utf-8", "replace")  # as written: '\r' kept
    if check and proc.returncode != 0:
        raise AssertionError(f"clipdistill {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def assert_plain_log(text: str, epochs: int) -> None:
    """What a person reading the log of a training verb needs: no carriage returns, short lines,
    and one line per epoch."""
    assert "\r" not in text
    assert max(map(len, text.splitlines())) <= 400
    for e in range(1, epochs + 1):
        said = [ln for ln in text.splitlines() if ln.startswith(f"epoch {e}/{epochs}: loss ")]
        assert len(said) == 1, text[-3000:]
        assert " img/s, " in said[0] and " elapsed" in said[0]


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_inside_basetemp(tmp_path_factory):
    """Every temporary file of the session's processes under pytest's own folder, removed with it:
    torchrun's torchelastic_* folders and the two that `import wandb` (img2dataset's) makes were
    left in /tmp by every run."""
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder))
        mp.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
        yield folder


@pytest.fixture(scope="session", autouse=True)
def _teacher_in_background(request, cache_dir, _temporary_files_inside_basetemp):
    """Start pre-training the tiny teacher in another process when the session starts, if a selected
    test needs it: it takes a minute or two on one thread (always one: `TinyTeacherConfig.threads`),
    which the tests that do not need it (run first: `teacher_last`) fill with work on the other core.
    The child's file is the one `ensure_tiny_teacher` would write here; `trained_teacher_file`
    waits for it."""
    from clipdistill.teacher.tiny import tiny_teacher_path

    wanted = any("trained_teacher_file" in getattr(it, "fixturenames", ()) for it in request.session.items)
    if WORKER or not wanted or tiny_teacher_path(cache_dir).is_file():
        yield None
        return
    log = open(cache_dir / "teacher-pretraining.log", "w")
    code = "import sys\nfrom clipdistill.teacher.tiny import ensure_tiny_teacher\nensure_tiny_teacher(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(cache_dir)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc
    if proc.poll() is None:  # a session that ended (or was stopped) before it was needed
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="session")
def trained_teacher_file(cache_dir, tmp_path_factory, _teacher_in_background) -> Path:
    """The real tiny-shapes teacher, as `make demo` builds it (pre-trained on one thread for a minute
    or two): shorter pre-training gives a teacher too weak to test distillation against. Under
    pytest-xdist one worker pre-trains it for all (the others wait on the lock) and each worker's
    cache links to it, where `--teacher tiny-shapes` finds it."""
    from clipdistill.teacher.tiny import ensure_tiny_teacher, tiny_teacher_path

    if _teacher_in_background is not None and _teacher_in_background.wait() != 0:
        # pre-trained here instead (the same file); the child's output says why it stopped
        print((cache_dir / "teacher-pretraining.log").read_text()[-3000:], file=sys.stderr)

    if WORKER:
        from clipdistill.core.locks import exclusive

        shared = tmp_path_factory.getbasetemp().parent / "shared-cache"
        shared.mkdir(exist_ok=True)
        with exclusive(shared / ".teacher.lock"):
            made = Path(ensure_tiny_teacher(shared, progress=False))
        mine = tiny_teacher_path(cache_dir)
        mine.parent.mkdir(parents=True, exist_ok=True)
        for src, dst in ((made, mine), (made.with_suffix(".json"), mine.with_suffix(".json"))):
            if not dst.exists():
                os.link(src, dst)
    return Path(ensure_tiny_teacher(cache_dir))


def train_kwargs(cache_dir: Path, teacher_file: Path, **over) -> dict:
    """A small but real shapes10 run: 1000 labelled, 2000 unlabeled, 2000 test images, with the
    study's quick recipe (no augmentation, cached targets, no warm-up): a few epochs learn
    under it, where the default recipe is made for long runs (tests/test_recipe.py covers it)."""
    kw = dict(pretrained=str(teacher_file), cache_dir=str(cache_dir), max_images=2000, student="resnet10t",
              epochs=4, batch_size=64, lr=2e-3, progress=False, augment="none", mixup=0.0, teaching="cached",
              warmup_epochs=0.0)
    kw.update(over)
    return kw


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir, random_teacher_file) -> Path:
    """A real run folder: resnet10t trained from shapes10 labels (a few epochs, one thread:
    the test machines' cores are shared, and oversubscribed torch threads crawl)."""
    import torch

    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train

    run = tmp_path_factory.mktemp("runs") / "resnet10t-labels"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(method="labels", data=["train"], epochs=5, student="resnet10t", batch_size=32, lr=3e-3,
                          amp="fp32", device="cpu", cache_dir=str(cache_dir), pretrained=str(random_teacher_file),
                          progress=False, out=str(run)))
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="session")
def embedding_run(tmp_path_factory, cache_dir, trained_teacher_file) -> Path:
    """A real distilled student that learnt the teacher's embedding (mse; the probe as its head) with the
    quick recipe: re-prompting and compression start from it."""
    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train

    run = tmp_path_factory.mktemp("runs") / "resnet10t-mse"
    train(TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, method="mse", head="linear",
                                     data=["train", "unlabeled"], out=str(run))))
    return run


def cli_subprocess(*args: str, code: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """`clipdistill ARGS` in a fresh interpreter; `code` runs after main() (e.g. to report
    which modules it imported)."""
    prog = ("import sys, json\nfrom clipdistill.cli import main\nrc = main(sys.argv[1:])\n" + code +
            "\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> dict:
    """fp32 + INT8 (cpu target) exports of the trained run, through the real CLI."""
    import json

    from clipdistill.deploy.writer import int8_path

    out = tmp_path_factory.mktemp("export") / "student.onnx"
    proc = cli_subprocess("export", "--run", str(trained_run), "--out", str(out), "--int8", "--calib-images", "144",
                          "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"fp32": out, "int8": int8_path(out, "cpu"), "result": json.loads(proc.stdout), "stderr": proc.stderr}


def last_epoch(run: Path) -> int:
    """The epoch of RUN's last checkpoint, 0 while there is none (or it is being replaced)."""
    from clipdistill.distill import checkpoint

    p = run / "checkpoints" / "last.safetensors"
    try:
        return checkpoint.load(p)["epoch"] if p.exists() else 0
    except Exception:  # noqa: BLE001 - being replaced right now
        return 0


def kill_after_first_epoch(args: list[str], out: Path, settle: float) -> int:
    """Run `clipdistill ARGS --out OUT`, SIGKILL it `settle` seconds after its first epoch's
    checkpoint lands, and return the epoch it had checkpointed."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "clipdistill", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and last_epoch(out) < 1 and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(settle)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return last_epoch(out)
