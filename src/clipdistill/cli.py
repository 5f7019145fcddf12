"""`clipdistill VERB ...`: a thin wrapper over the Python API.

Every verb is the same three things, named in one registry (`VERBS`): a config dataclass (its
flags are generated from it, see core/config.py; it validates itself), a run function that takes
the config and returns a dict (the Python API), and a formatter that turns that dict into what a
person reads. The glue is here and only here: parse the flags, build the config, run, print the
text or, with --json, the dict; errors become exit codes. Modules are imported only for the
verb that runs, so `clipdistill --help` answers at once."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .core import extras
from .core.errors import ClipDistillError, ConfigError
from .core.registry import Registry

JSON_HELP = "print the result as one JSON object on stdout"


@dataclass
class Verb:
    summary: str
    description: str
    config: str  # "module:Class": the flags, validated in its __post_init__
    run: str  # "module:function(cfg) -> dict"
    text: Optional[str] = None  # "module:function(result, cfg) -> str": what stdout says; None: nothing
    json: Optional[str] = None  # --json's help; None: the verb has no --json
    json_omit: tuple[str, ...] = ()  # keys of the result --json leaves out
    failures: Optional[str] = None  # "module:function(result) -> list[str]": said on stderr; any makes exit 1
    inputs: Optional[dict] = None  # a positional argument (argparse's keywords), given to run as `inputs`
    streams: bool = False  # run(cfg, ..., emit=) hands each item over as it comes; printed at once, as the result
    needs: tuple[str, ...] = ()  # install extras it cannot run without (core/extras.py): checked before its flags


TRAIN = ("train",)  # the verbs that train, embed or export: torch, timm, open_clip, ...


VERBS: Registry[Verb] = Registry("verb")


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module, __package__), name)


def _stderr(*a, **k):
    print(*a, file=sys.stderr, **k)


# ------------------------------------------------------------------------------ verbs

VERBS.add("embed", Verb(
    "cache the teacher's image embeddings of one dataset split",
    "Runs the teacher over every image of a split in batches and stores the embeddings as one float16 array "
    "plus manifest.json under CACHE_DIR/embeddings/TEACHER/DATASET/SPLIT. Interrupted runs resume where they "
    "stopped; a cache made by another teacher or preprocess is refused (rebuild with --overwrite).\n\n"
    "examples:\n  clipdistill embed --dataset shapes10 --split unlabeled\n"
    "  clipdistill embed --teacher ViT-B-32 --pretrained laion2b_s34b_b79k --dataset stl10 --split train "
    "--data-root ~/data\n  clipdistill embed --dataset folder --data-root ~/my_images --split train",
    ".teacher.embed:EmbedConfig", ".cli:_embed", ".cli:_embed_text", needs=TRAIN))

VERBS.add("make-pool", Verb(
    "write an offline example of your own job: a nested pool of photos, prompts and a labelled test folder",
    "Renders shapes10 scenes of all ten classes into OUT/pool/ as photos are kept (folders by month, bursts, "
    "byte-identical copies, a few broken files), prompts for some classes into OUT/classes.txt and labelled "
    "images of those classes into OUT/eval/test/<class>/, and of the other classes into OUT/eval/unprompted/<class>/ "
    "(what the model passes look-alikes as: REPORT.md's table). Most of the pool matches no prompt, as in real "
    "photo folders. What `fit-prompts` is measured on.\n\n"
    "examples:\n  clipdistill make-pool --out my-pool\n"
    "  clipdistill make-pool --out my-pool --classes ring,cross,square,heart --seed 1",
    ".data.example_pool:PoolConfig", ".data.example_pool:make_pool", ".cli:_pool_text", json=JSON_HELP, needs=TRAIN))

VERBS.add("teacher-eval", Verb(
    "zero-shot and linear-probe accuracy of the teacher (the study's first table)",
    "Caches the train and test embeddings, classifies the test split with the text head (cosine to the class "
    "prompts, times --logit-scale) and with a linear probe trained on train (its epoch picked on a held-out "
    "part of train, never on test). Writes OUT/teacher_eval.json.\n\n"
    "examples:\n  clipdistill teacher-eval                      # tiny-shapes teacher on shapes10, offline\n"
    "  clipdistill teacher-eval --teacher ViT-B-32 --dataset stl10 --json",
    ".teacher.evaluate:TeacherEvalConfig", ".teacher.evaluate:teacher_eval", ".cli:_teacher_eval_text", json=JSON_HELP,
    json_omit=("config",), needs=TRAIN))


VERBS.add("train", Verb(
    "distil (or train from labels) a timm student",
    "One training loop for every method. Teacher outputs come from the embedding cache (filled on first "
    "use); the epoch's best weights are picked on a held-out part of the labelled train split (or teacher "
    "agreement when there are no labels), never on test. The run folder holds config.json, "
    "checkpoints/{last,best}.safetensors (last: full state), metrics.jsonl, tensorboard/, result.json and "
    "student/ (the student as timm loads it). A killed run continues with the same command (--resume auto); "
    "a second process on the same --out is refused. Several GPUs or nodes: "
    "`torchrun --nproc_per_node N -m clipdistill train ...`.\n\n"
    "methods (--method, combine with +):\n" + "{methods}" + "\n\n"
    "examples:\n  clipdistill train --method labels --data train                 # the study's from-scratch baseline\n"
    "  clipdistill train --method kl --head linear --data train,unlabeled\n"
    "  clipdistill train --method kl --head text --logit-scale 1 --data train,unlabeled   # the study's T=1 text row\n"
    "  clipdistill train --method mse --head text --data train,unlabeled --student resnet34",
    ".distill.config:TrainConfig", ".distill.train:train", ".cli:_run_text", json=JSON_HELP, needs=TRAIN))

VERBS.add("eval", Verb(
    "test accuracy and teacher agreement of a trained run",
    "Loads the run's best checkpoint and writes RUN/result.json with test_accuracy, teacher_agreement and "
    "per-class accuracy (percent).\n\nexample:\n  clipdistill eval --run runs/shapes10-resnet18-kl-auto-train",
    ".distill.evaluate:EvalConfig", ".distill.evaluate:evaluate_run", ".cli:_run_text", json=JSON_HELP, needs=TRAIN))


VERBS.add("experiments", Verb(
    "list the study's experiments and their settings, per suite",
    "Each experiment is one row of the study's tables, built from the same config as `clipdistill train`.",
    ".cli:NoConfig", ".cli:_experiments", ".cli:_experiments_text", needs=TRAIN))

VERBS.add("reproduce", Verb(
    "run the study's experiments and write RESULTS.md, results.json and plots",
    "Runs what is missing (embeddings, probe, students), reuses what is done and resumes what was "
    "interrupted; every number in the report is read from a run's result.json.\n\n"
    "examples:\n  clipdistill reproduce --suite shapes10 --full          # offline, CPU\n"
    "  clipdistill reproduce --suite stl10 --data-root ~/data     # the study, on a GPU machine\n"
    "  clipdistill reproduce --suite stl10 --only resnet18_linear_train_unlabeled",
    ".study.reproduce:ReproduceConfig", ".study.reproduce:reproduce", ".cli:_report_text", needs=TRAIN))

VERBS.add("demo", Verb(
    "the study replayed offline on shapes10 with the tiny teacher (what `make demo` runs)",
    "= `clipdistill reproduce --suite shapes10` with a compact selection that answers the study's questions: "
    "teacher zero-shot and probe; from scratch vs distilled on train only; the gain from unlabeled data; "
    "KL vs MSE. --full adds the student sizes and the remaining rows. Generates shapes10 and pre-trains the "
    "tiny teacher on first use (cached).",
    ".study.reproduce:DemoConfig", ".study.reproduce:demo", ".cli:_demo_text", needs=TRAIN))


@dataclass
class NoConfig:
    pass


VERBS.add("export", Verb(
    "a trained student (or a teacher's image encoder) as ONNX, checked against PyTorch; --int8 adds INT8",
    "Writes the student as ONNX (dynamic batch, the trained side unless --size) with its head folded in, so it "
    "outputs class logits; the input size, normalisation and resize rule, class names, prompts, teacher and "
    "accuracy go into the ONNX metadata and a JSON sidecar (OUT with .json). ONNX Runtime and PyTorch run the "
    "same real test images; the largest difference is printed and past --tolerance nothing is written. "
    "--int8 adds OUT.int8.onnx: ONNX Runtime static quantization (QDQ, per-channel int8 weights) calibrated on "
    "the run's training images, with test accuracy before and after (fails past --max-drop points). "
    "--teacher exports an open_clip image encoder the same way, for `clipdistill bench`.\n\n"
    "examples:\n  clipdistill export --run runs/shapes10-resnet18-kl-linear-train --int8\n"
    "  clipdistill export --run runs/RUN --size 224 --int8          # the study's 224 px setting\n"
    "  clipdistill export --run runs/RUN --int8 --int8-target tensorrt   # symmetric int8 for TensorRT\n"
    "  clipdistill export --teacher ViT-B-32 --pretrained random --out vit-b-32.onnx   # speed/memory only",
    ".deploy.export:ExportConfig", ".deploy.export:export", json=JSON_HELP, json_omit=("info",), needs=TRAIN))

VERBS.add("compress", Verb(
    "QAT (INT8 Q/DQ) or 2:4 sparsity of a trained student, in the form TensorRT builds",
    "NVIDIA Model Optimizer on the run's best student: `ptq` calibrates INT8 fake quantization (TensorRT's form: "
    "symmetric int8, per-channel weights); `qat` then fine-tunes a few epochs with the run's own recipe; "
    "`sparse24` prunes every eligible layer to 2:4 and fine-tunes. Writes RUN/model.MODE.onnx (Q/DQ nodes, or "
    "2:4 zeros in the weights) with its sidecar, the accuracy before and after (PyTorch and ONNX Runtime), and the "
    "trtexec command that builds it on a TensorRT machine.\n\n"
    "examples:\n  clipdistill compress --run runs/RUN --mode qat\n"
    "  clipdistill compress --run runs/RUN --mode sparse24 --epochs 5",
    ".deploy.compress:CompressConfig", ".deploy.compress:compress", ".deploy.compress:text", json=JSON_HELP,
    needs=("train", "compress")))

VERBS.add("check-bundle", Verb(
    "check a deployment bundle: its manifest, a lint of each ONNX file, and every runtime's files",
    "Re-verifies the sha256 of every file of a bundle (OUT.bundle/, written by export, compress and fit-prompts) "
    "and its modes (0644/0755), runs every model again in this machine's ONNX Runtime on the bundle's probe images "
    "and compares with the outputs recorded where it was written (on the device too: the check that its runtime "
    "computes what the training machine did), lints every ONNX file with `polygraphy check lint`, and runs each "
    "runtime's own "
    "check: jetson-inference's preprocessing emulated on real images against predict's, DeepStream's formula on its "
    "config's numbers, the Triton config parsed with Triton's protobuf, OpenCV DNN against ONNX Runtime, the timm "
    "folder loaded with timm. One pass/fail line per file and target; a check that cannot run here says `skip` "
    "and why. Exit 1 on any failure.\n\n"
    "examples:\n  clipdistill check-bundle runs/RUN/model.bundle\n"
    "  clipdistill check-bundle runs/mine/model.bundle --images 0   # runtimes' checks without test images",
    ".deploy.bundle:CheckBundleConfig", ".deploy.bundle:run", ".deploy.bundle:text", json=JSON_HELP,
    failures=".deploy.bundle:failures", inputs={"metavar": "DIR", "help": "the bundle folder (OUT.bundle/)"}))

VERBS.add("bench", Verb(
    "throughput, latency and memory of ONNX models per backend; the student/teacher table",
    "Each (model, backend) row runs in a fresh process: warm-up, then timed batches of random input; reports "
    "images/s, latency per batch (p50, p99) and the model's peak memory (process peak minus its baseline). "
    "Backends not installed here are reported as skipped. Writes --out (a list of records) and prints the "
    "deployment table with the student/teacher ratios.\n\n"
    "examples:\n  clipdistill bench --model runs/RUN/model-224px.onnx --model vit-b-32.onnx\n"
    "  clipdistill bench --model runs/RUN/model.int8.onnx --model runs/RUN/model.onnx --backend ort-cpu,torch\n"
    "  clipdistill bench --model student.onnx --backend trtexec     # on a Jetson or GPU machine",
    ".deploy.bench:BenchConfig", ".deploy.bench:bench", ".deploy.bench:text", json=JSON_HELP,
    failures=".deploy.bench:failures"))

VERBS.add("fit-prompts", Verb(
    "your classes in words + your unlabeled images -> a small deployable classifier, no labels",
    "One command for the whole road: index the pool (duplicates counted once, broken files listed), embed it with "
    "the teacher, curate it per prompt (contact sheets of what was kept), train the student with the teacher in "
    "the loop on its own augmented views, assess it without labels (agreement and confusion against the teacher, "
    "a sheet of disagreements, a calibrated 'none of these' threshold), export ONNX and INT8. With --eval, accuracy "
    "on labelled images too. Everything goes to --out; killed, the same command continues where it stopped.\n\n"
    "examples:\n  clipdistill make-pool --out demo-pool      # an offline example pool\n"
    "  clipdistill fit-prompts --prompts demo-pool/classes.txt --pool demo-pool/pool --eval demo-pool/eval "
    "--out runs/demo-fit\n"
    "  clipdistill fit-prompts --teacher ViT-B-32 --pretrained laion2b_s34b_b79k --prompts classes.txt "
    "--pool ~/Pictures --out runs/mine",
    ".fit.config:FitConfig", ".fit.pipeline:fit_prompts", ".cli:_fit_text", json=JSON_HELP, needs=TRAIN))

VERBS.add("search", Verb(
    "find images for your prompts: top-N per prompt from an embedded pool or a clip-retrieval knn service",
    "Before training, for a user with words and no (or too many) images: --pool searches a pool of folders or tar "
    "shards (embedded first if it is not yet, into the cache fit-prompts uses) exactly by cosine; --service asks a "
    "clip-retrieval knn service, as NVIDIA-AI-IOT/clip-distillation asks LAION's (retries with back-off, "
    "--rate-limit, every answer cached in OUT/service/: a killed search asks again only the prompts not answered). "
    "Every image goes to one prompt only, the one it matches best. Writes OUT/results.jsonl (url, caption, "
    "similarity, prompt, class: what img2dataset reads; results.parquet too with pyarrow) and "
    "OUT/sheets/PROMPT.png, the top results of each prompt to look at.\n\n"
    "examples:\n  clipdistill search --prompts classes.txt --pool ~/Pictures --per-class 500 --out runs/found\n"
    "  clipdistill search --prompts classes.txt --pool 'shards/pool-{000..099}.tar' --per-class 2000\n"
    "  clipdistill search --prompts classes.txt --service https://knn.laion.ai/knn-service --index laion5B-L-14 "
    "--per-class 200 --rate-limit 1",
    ".teacher.search:SearchConfig", ".teacher.search:search", ".teacher.search:text", json=JSON_HELP, needs=TRAIN))

VERBS.add("serve-knn", Verb(
    "serve an embedded pool as a clip-retrieval knn service (what search --service asks), with its images",
    "For an archive on one machine and prompts on another (a NAS of photos, shards on a file server): the pool is "
    "embedded into the cache fit-prompts uses (once), then answered over HTTP in clip-retrieval's knn-service "
    "protocol, each prompt encoded by the teacher's text tower, its images at /images/ROW.png. Also the offline "
    "way through the words-only road: serve a pool on 127.0.0.1, then search, download and fit-prompts as against "
    "LAION's service. No authentication: listen beyond 127.0.0.1 only on a network you trust.\n\n"
    "examples:\n  clipdistill serve-knn --pool my-pool/pool --port 1234\n"
    "  clipdistill search --prompts my-pool/classes.txt --service http://127.0.0.1:1234/knn-service --index pool",
    ".teacher.knn_server:ServeKnnConfig", ".teacher.knn_server:serve", ".teacher.knn_server:text", json=JSON_HELP,
    streams=True, needs=TRAIN))

VERBS.add("download", Verb(
    "fetch the images a search found into WebDataset shards (img2dataset), a pool fit-prompts reads as it is",
    "After `clipdistill search`: img2dataset downloads every URL of its results.jsonl (threads, retries, larger "
    "images resized to --image-size on their shorter side) into OUT/00000.tar, ... with each image's caption, "
    "prompt and similarity beside it. Failed downloads (HTTP errors, timeouts, bytes that are not an image) and "
    "duplicates (the same bytes under two URLs) are counted, never fatal. A local search's file paths are "
    "fetched as file:// URLs (a NAS's few thousand images that matter, in compact shards). Killed, the same "
    "command fetches only the shards not finished. Needs the download extra: pip install 'clipdistill[download]'."
    "\n\nexamples:\n  clipdistill download --results runs/search-classes/results.jsonl\n"
    "  clipdistill download --results runs/found/results.jsonl --out shards/found --image-size 384 --processes 2\n"
    "then: clipdistill fit-prompts --prompts classes.txt --pool 'shards/found/{00000..00003}.tar' --out runs/mine",
    ".data.download:DownloadConfig", ".data.download:download", ".data.download:text", json=JSON_HELP,
    needs=("download",)))

VERBS.add("predict", Verb(
    "top-k classes per image from an exported ONNX model (ONNX Runtime, numpy and Pillow only)",
    "Reads the input size, normalisation and class names from the model's metadata; folders are read in "
    "batches; a file that cannot be read is skipped with a warning naming it.\n\n"
    "examples:\n  clipdistill predict --model runs/RUN/model.int8.onnx photos/\n"
    "  clipdistill predict --model model.onnx cat.jpg dog.png --top-k 3 --json",
    ".deploy.predict:PredictConfig", ".deploy.predict:run", ".deploy.predict:text",
    json="print the result as JSON (videos: one JSON line per frame, then, for a file shorter than its header says, "
         "a line {source, truncated, frames_in_header, frames_read})",
    inputs={"nargs": "*", "metavar": "IMAGE_FOLDER_OR_VIDEO",
            "help": "image files, folders of images, and/or video files (.mp4, .avi, .mov, ...)"},
    streams=True, needs=("device",)))


# ------------------------------------------------------------------------------ results as text
# The verbs whose stage modules carry no formatter (or run function returning a dict) of their own.

def _embed(cfg) -> dict:
    from .teacher.embed import embed

    return {"path": str(embed(cfg).path)}


def _embed_text(res: dict, cfg) -> str:
    return res["path"]


def _experiments(cfg) -> dict:
    from .study.reproduce import list_experiments

    return {"experiments": list_experiments()}


def _experiments_text(res: dict, cfg) -> str:
    return res["experiments"]


def _run_text(res: dict, cfg) -> str:
    """A trained or evaluated run in one line."""
    acc = res["test_accuracy"]
    where = f"test accuracy {acc:.2f}%" if res.get("n_test") and acc == acc else "no labelled test images"
    return (f"{res['run_dir']}: {where}, teacher agreement {res['teacher_agreement']:.2f}% ({res['student']}, "
            f"{res['method']}, head {res['head']}, data {res['data']})")


def _report_text(res: dict, cfg) -> str:
    return f"{res['markdown']}\nreport: {res['out']}/RESULTS.md (results.json, plot_*.png/svg beside it)"


def _demo_text(res: dict, cfg) -> str:
    return (f"{res['markdown']}\nreport: {res['out']}/RESULTS.md (results.json, plot_*.png/svg beside it); took "
            f"{res['seconds']:.0f} s")


def _fit_text(res: dict, cfg) -> str:
    return (Path(res["out"]) / "REPORT.md").read_text(encoding="utf-8").removesuffix("\n")  # print() ends the line


def _pool_text(res: dict, cfg) -> str:
    where = f"in {cfg.shards} tar shards" if cfg.shards else "in nested folders"
    pool = f"'{res['pool']}'" if cfg.shards else res["pool"]  # braces: quoted for the shell
    others = (f", images of no prompted class: {res['eval']}/unprompted/ ({res['unprompted_images']})"
              if res.get("unprompted_images") else "")
    return (f"wrote {res['pool']}: {res['images']} images of all ten shapes10 classes {where}, "
            f"{res['duplicates']} duplicates, {res['broken']} broken files ({res['matching_prompts']} images "
            f"match a prompt)\nprompts for {', '.join(res['classes'])}: {res['prompts']}\nlabelled test images: "
            f"{res['eval']}/test/ ({res['test_images']}){others}\nnext: clipdistill fit-prompts --prompts "
            f"{res['prompts']} --pool {pool} --eval {res['eval']} --out runs/my-classifier")


def _teacher_eval_text(res: dict, cfg) -> str:
    lp = res["linear_probe_accuracy"]
    return "\n".join([
        f"teacher {cfg.teacher} on {cfg.dataset} test ({res['n_test']} images):",
        f"  zero-shot (text prompts): {res['zero_shot_accuracy']:.2f}%",
        f"  linear probe:             {lp:.2f}%" if lp is not None else
        "  linear probe:             - (no labelled train/ images)",
        f"wrote {res['path']}"])


# ------------------------------------------------------------------------------ parsing

def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<14} {VERBS.get(name).summary}" for name in VERBS)
    p = argparse.ArgumentParser(
        prog="clipdistill", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil an OpenCLIP teacher into a small, fast timm image classifier.",
        epilog=f"verbs:\n{lines}\n\nRun `clipdistill VERB --help` for the flags of a verb.")
    p.add_argument("verb", nargs="?", help="one of: " + ", ".join(VERBS))
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def build_parser(verb: str) -> argparse.ArgumentParser:
    from .core.config import add_arguments

    v = VERBS.get(verb)
    description = v.description
    if "{methods}" in description:
        from .distill.methods import describe_methods

        description = description.replace("{methods}", describe_methods())
    p = argparse.ArgumentParser(prog=f"clipdistill {verb}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, _load(v.config))
    if v.inputs is not None:
        p.add_argument("inputs", **v.inputs)
    if v.json is not None:
        p.add_argument("--json", action="store_true", help=v.json)
    out = p.add_mutually_exclusive_group()
    out.add_argument("-v", "--verbose", action="store_true", help="also print debug details (with module names)")
    out.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and the result")
    return p


def _sleeping_waits() -> None:
    """torch's OpenMP threads sleep when they wait instead of spinning, unless the user chose
    (OMP_WAIT_POLICY set). On two cores shared with one other busy program, a spinning thread burns
    the time slice its partner needs: training ran 4-12x slower than with sleeping waits
    (benchmarks/bench_busy.md). The arithmetic is the same either way. OpenMP reads it when torch
    loads, so it is set here, before any verb imports torch; DataLoader workers and torchrun's
    processes inherit it. A Python API user sets it in their own environment."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[list[str]] = None) -> int:
    _sleeping_waits()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        top = _top_parser()
        ns = top.parse_args(argv)
        if ns.version:
            from . import __version__
            print(__version__)
            return 0
        top.print_help()
        return 0 if argv else 2
    verb = argv[0]
    if verb not in VERBS:
        _top_parser().error(f"unknown verb {verb!r}; valid: {', '.join(VERBS)}")
    gone = extras.missing(VERBS.get(verb).needs)
    if gone:  # the device's light install: one line that says what to install, not a traceback
        _stderr(extras.message(verb, gone))
        return ConfigError.exit_code
    try:
        parser = build_parser(verb)
    except ModuleNotFoundError as e:
        return _missing_module(verb, e)
    args = parser.parse_args(argv[1:])
    from .core.config import from_namespace
    from .core.logs import setup

    setup(1 if args.verbose else -1 if args.quiet else 0)
    try:
        cfg = from_namespace(_load(VERBS.get(verb).config), args)
        return _run(VERBS.get(verb), cfg, args)
    except ConfigError as e:
        parser.error(str(e))  # exits 2, with usage
    except ClipDistillError as e:
        _stderr(f"clipdistill {verb}: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _stderr(f"clipdistill {verb}: interrupted; run the same command again to resume")
        return 130
    except ModuleNotFoundError as e:
        return _missing_module(verb, e)
    except OSError as e:  # a path that cannot be made or written: its name is in the message
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _stderr(f"clipdistill {verb}: error:{where}: no space left on the device; free some space (or point "
                    f"--out/--cache-dir elsewhere) and run the same command again to continue")
            return 1
        _stderr(f"clipdistill {verb}: error:{where}: {e.strerror or e}; check the --out/--cache-dir/--run "
                f"paths (a folder where a file is expected, or the reverse, or no permission)")
        return 1
    return 0


def _missing_module(verb: str, e: ModuleNotFoundError) -> int:
    """A package of an install extra that the verb's `needs` did not name, met on the way: the same
    one line (which extra installs it); any other missing module is a bug, with its traceback."""
    extra = extras.extra_of(e.name, VERBS.get(verb).needs)
    if extra is None:
        raise e
    _stderr(extras.message(verb, {extra: [e.name.split(".")[0]]}))
    return ConfigError.exit_code


def _show(result: dict, cfg, text, as_json: bool, flush: bool = False) -> None:
    """A result (or a streamed item) on stdout: JSON, or the verb's text when it has any."""
    if as_json:
        print(json.dumps(result, default=str), flush=flush)
        return
    said = text(result, cfg) if text else None
    if said:
        print(said, flush=flush)


def _run(v: Verb, cfg, args) -> int:
    """config -> run -> stdout (text or --json), problems on stderr; the exit code."""
    as_json = bool(getattr(args, "json", False))
    text = _load(v.text) if v.text else None
    kwargs: dict = {}
    if v.inputs is not None:
        kwargs["inputs"] = args.inputs
    if v.streams:
        kwargs["emit"] = lambda item: _show(item, cfg, text, as_json, flush=True)
    result = _load(v.run)(cfg, **kwargs)
    problems = _load(v.failures)(result) if v.failures else []
    for line in problems:
        _stderr(line)
    if not v.streams:
        _show({k: x for k, x in result.items() if k not in v.json_omit} if as_json else result, cfg, text, as_json)
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
