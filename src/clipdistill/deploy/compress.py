"""`clipdistill compress`: quantization-aware training and 2:4 sparsity for TensorRT, as
NVIDIA-AI-IOT/clip-distillation does, with NVIDIA Model Optimizer (`pip install 'clipdistill[compress]'`).

- `ptq`: Model Optimizer's INT8 fake quantization in TensorRT's form (symmetric int8,
  per-channel weights, per-tensor activations), calibrated on training images; no training.
- `qat`: the same, then a short fine-tune with the run's own distillation recipe (the teacher's
  targets, the same augmented views): the weights learn to live with the rounding. Depthwise
  students (MobileNet, EfficientNet) are where post-training INT8 loses most, and QAT wins it back.
- `sparse24`: every eligible convolution/linear weight pruned to two zeros in each group of four
  along its input channels (magnitude), fine-tuned with the masks kept, then baked into the
  weights. TensorRT builds those layers with sparse tensor cores (`trtexec --sparsity=enable`);
  on a CPU, and in PyTorch for convolutions, 2:4 brings no speed: only the pattern is checked here.

So compress is calibrate (or prune) -> fine-tune -> the same writer as export (writer.py): the
student is loaded as export loads it (deployable.py), its encoder replaced by the compressed one.
The fine-tune is `clipdistill train`'s loop over the run's context (distill/context.py: the run's
config, 4 epochs at a third of the run's rate by default, in a fresh folder beside the run), so
augmentation and validation are the run's, and so is the teaching mode: the one the run recorded,
not one chosen again by timing a quantized student. The ONNX file comes from the fine-tuned model
in the same process (Q/DQ nodes for `ptq`/`qat`: the form TensorRT builds as INT8 with `--int8`),
checked against PyTorch and measured on the test split with ONNX Runtime. A killed compress
starts again from the run's `best` (it takes minutes; the fine-tune folder is replaced): nothing
of Model Optimizer's state is pickled to disk."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core import atomic
from ..core.config import Rule, at_least, check, check_fields, common_options, option, preset
from ..core.errors import ConfigError, MissingSplitError
from ..core.metrics import accuracy
from ..data.options import DataOptions
from ..distill import checkpoint
from ..distill.config import OptimiserOptions, RunOptions, TrainConfig
from ..distill.record import StudentRecord
from ..distill.rundir import RunDir
from ..teacher.options import TeacherOptions
from .bundle import BundleOptions, write_for
from .deployable import load_student
from .inputs import prepare
from .parity import ParityError, parity_inputs
from .runtime import onnx_accuracy
from .tensorrt import requirements, trtexec_command
from .writer import FORMAT, converted, write

log = logging.getLogger(__name__)

MODES = ("qat", "ptq", "sparse24")
# ONNX's QuantizeLinear/DequantizeLinear take a per-axis scale (the `axis` attribute) from opset 13
# (onnx/docs/Changelog.md, DequantizeLinear-13); Model Optimizer's weights are per output channel.
MIN_QDQ_OPSET = 13


# compress is a preset over `clipdistill train`'s options, as fit-prompts is: the ones it shows as
# flags, with its own defaults and words; each keeps train's type, rule and runtime mark unless
# changed here. What it shares with train by name goes into the fine-tune's config (`fine_tune_config`).
CompressOptimiser = preset(
    OptimiserOptions,
    epochs={"default": 4, "help": "fine-tune epochs (qat, sparse24)"},
    lr={"default": 0.0, "help": "fine-tune learning rate (Adam, cosine, no warm-up); 0 = a third of the run's own, "
                               "the rate measured best in benchmarks/compress_students.md",
        "valid": Rule(lambda v: v >= 0, "must be > 0, or 0 for a third of the run's learning rate")})
CompressCache = preset(TeacherOptions, cache_dir={"default": "", "help": "override the run's cache folder"})
CompressData = preset(DataOptions, max_images={
    "help": "quick trials: the first N images of each split (test included) instead of the run's",
    "valid": at_least(0, "0 = the run's")})
CompressRun = preset(RunOptions, seed={"help": "fine-tune seed"}, progress={})

# What every fine-tune sets over the run's config: Adam at the fine-tune's rate, a cosine decay
# without warm-up, fp32 (Model Optimizer's fake quantization runs in it) and the plain memory
# format (its sparsity refuses channels-last); a fresh folder each time, so nothing to resume.
FINE_TUNE = {"warmup_epochs": 0.0, "schedule": "cosine", "amp": "fp32", "channels_last": False, "resume": "auto"}


# Listed last-flag-first, as TrainConfig's groups are.
@dataclasses.dataclass
class CompressConfig(BundleOptions, CompressRun, CompressData, CompressCache, CompressOptimiser):
    run: str = option("", "run folder written by `clipdistill train` (its best checkpoint is compressed)",
                      metavar="DIR")
    mode: str = option("qat", "qat: INT8 fake quantization then a fine-tune; ptq: the INT8 calibration alone; "
                              "sparse24: 2:4 structured sparsity then a fine-tune", choices=list(MODES))
    calib_images: int = option(512, "training images that calibrate the INT8 ranges", valid=at_least(8))
    out: str = option("", "ONNX file to write; default RUN/model.MODE.onnx", metavar="FILE")
    tolerance: float = option(1e-2, "parity: fail when max |onnxruntime - pytorch| > this x max(1, max |pytorch|) "
                                    "plus, for INT8, PyTorch's own spread when its layer outputs change by 1e-6 "
                                    "(an activation on a rounding boundary moves a whole step)",
                              valid=Rule(lambda v: v > 0, "must be > 0"))
    control: bool = option(False, "also fine-tune an uncompressed copy the same way (epochs, lr, seed) and report "
                                   "its accuracy: whether a change comes from the compression or from the extra epochs")
    opset: int = option(17, "ONNX opset of the file (7 to 23; qat/ptq: 13 or more, the first with per-channel "
                            "DequantizeLinear). TensorRT 8.2 (JetPack 4.6) parses opset <= 13, 8.5/8.6 "
                            "(JetPack 5.1/6.0) <= 17", valid=Rule(lambda v: 7 <= v <= 23, "must be between 7 and 23"))

    def __post_init__(self) -> None:
        check(bool(self.run) and Path(self.run).is_dir(), "run", "give a run folder made by `clipdistill train`")
        check(RunDir(self.run).best.is_file(), "run", f"{self.run} has no best checkpoint; train it first")
        check_fields(self)
        check(not (self.control and self.mode == "ptq"), "control", "ptq does not fine-tune: nothing to control for")
        check(self.mode == "sparse24" or self.opset >= MIN_QDQ_OPSET, "opset",
              f"{self.opset} cannot carry {self.mode}'s INT8 Q/DQ: its per-channel weight scales need "
              f"DequantizeLinear's axis, which ONNX has from opset {MIN_QDQ_OPSET}; "
              f"give --opset {MIN_QDQ_OPSET} or more "
              f"(TensorRT 8.2 / JetPack 4.6 parses up to 13)")
        self._check_bundle()

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else RunDir(self.run).path / f"model.{self.mode}.onnx"


def modelopt():
    """(quantization, sparsity) modules of NVIDIA Model Optimizer, or a ConfigError saying how
    to install them."""
    try:
        import modelopt.torch.quantization as mtq
        import modelopt.torch.sparsity as mts
    except ImportError as e:
        raise ConfigError(f"compress needs NVIDIA Model Optimizer ({e}); pip install 'clipdistill[compress]'") \
            from None
    return mtq, mts


def sparsity_24(module: torch.nn.Module) -> dict:
    """How many convolution/linear weights hold the 2:4 pattern (two zeros in every group of
    four along the input channels, at each kernel position), in PyTorch weights."""
    layers, sparse = [], []
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            frac = fraction_24(m.weight.detach().cpu().numpy())
            if frac is not None:
                layers.append(name)
                if frac == 1.0:
                    sparse.append(name)
    return {"eligible_layers": len(layers), "layers_2to4": len(sparse), "sparse": sparse}


def fraction_24(w: np.ndarray) -> Optional[float]:
    """Share of the groups of four input channels with >= 2 zeros; None when the input
    channels do not come in fours (those layers stay dense). Conv weights are (out, in, kh, kw),
    linear (out, in); ONNX initializers have the same layout."""
    if w.ndim == 4:
        w = w.transpose(0, 2, 3, 1).reshape(-1, w.shape[1])
    if w.ndim != 2 or w.shape[1] % 4 or w.shape[1] < 4:
        return None
    g = w.reshape(w.shape[0], -1, 4)
    return float(((g == 0).sum(-1) >= 2).mean())


def fine_tune_config(cfg: CompressConfig, fine_tune: Path) -> TrainConfig:
    """The config of a fine-tune in the folder `fine_tune`: the run's own, with the options compress
    shares with train (epochs, seed, progress; the cache folder and the image cap when given),
    FINE_TUNE and the fine-tune's rate."""
    saved = RunDir(cfg.run).read_config()
    shared = {k: v for k, v in common_options(cfg, TrainConfig).items() if v or k not in ("cache_dir", "max_images")}
    return TrainConfig(**{**saved, **shared, **FINE_TUNE, "out": str(fine_tune), "lr": fine_tune_lr(cfg, saved)})


def _context(cfg: CompressConfig, fine_tune: Path):
    """The run as a fine-tune in `fine_tune` sees it: its data, teacher outputs, head and student."""
    from ..distill.context import RunContext

    return RunContext(fine_tune_config(cfg, fine_tune))


def fine_tune_lr(cfg: CompressConfig, saved: dict) -> float:
    """--lr, or a third of the rate the run was trained at: a fine-tune rate is relative to the
    scale the weights were trained at, and a fixed one is too low for one run and too high for
    another. A third, not the usual tenth: at a tenth, the INT8 fine-tunes of depthwise students
    ended clearly below the same fine-tune without quantization, at a third level with it
    (benchmarks/compress_students.md)."""
    return cfg.lr or saved["lr"] / 3


def _accuracy(ctx) -> float:
    """Test accuracy. `RunContext.predict` leaves the student in the mode it was in: what follows a
    measurement must not depend on it having been taken (Model Optimizer's calibration sets eval
    mode itself; a forward of our own after it would otherwise use batch statistics and move
    BatchNorm's running ones)."""
    s, _, y = ctx.predict(ctx.data.rows("test"))
    return accuracy(s.argmax(1), y)


def rounding_envelope(module: torch.nn.Module, x: torch.Tensor, reference: np.ndarray, seeds: int = 20,
                      rel: float = 1e-6) -> float:
    """How far a fake-quantized network's output moves when every convolution/linear output
    changes by up to one part in a million: what another summation order (ONNX Runtime's
    kernels, TensorRT's) may do to it. An activation that lands on a rounding boundary moves a
    whole INT8 step under such a change and carries it to the output: after a few QAT epochs,
    tiny nudges inside PyTorch alone moved a student's logits exactly as far as ONNX Runtime's
    graph did, while each quantized layer exported alone agreed with PyTorch (README, "Compress
    for TensorRT"). So a Q/DQ graph that computes the same network may differ by this much; a
    wrong graph (a train-mode BatchNorm, a missing quantizer) differs by more and on most images.
    ONNX Runtime's summation order is one more draw of the same kind, and it can land beyond the
    widest of a few draws (it once did): so `seeds` draws, and the caller allows twice the widest."""
    ref = torch.from_numpy(reference)
    worst = 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)

        def nudge(m, i, o, g=g):
            return o * (1 + rel * (torch.rand(o.shape, generator=g) * 2 - 1))

        hooks = [m.register_forward_hook(nudge) for m in module.modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        try:
            with torch.no_grad():
                worst = max(worst, float((module(x) - ref).abs().max()))
        finally:
            for h in hooks:
                h.remove()
    return worst


def check_test_agreement(result: dict, n_test: int) -> None:
    """The file's test accuracy in ONNX Runtime must be PyTorch's within 1 point (or 3 images on
    a small test split). The rounding envelope can be wide (a fair share of the logits' range on a
    MobileNetV3; README, "Compress for TensorRT"), so this is the check a subtly wrong Q/DQ graph
    cannot pass: one-step flips move a few images, a wrong graph moves many."""
    ref = result.get("fine_tuned_accuracy", result.get("ptq_accuracy"))
    allowed = max(1.0, 300.0 / max(1, n_test))
    if ref is not None and not abs(result["onnx_accuracy"] - ref) <= allowed:
        raise ParityError(f"the ONNX file's test accuracy in ONNX Runtime ({result['onnx_accuracy']:.2f}%) is not "
                          f"PyTorch's ({ref:.2f}%) within {allowed:.2f} points on {n_test} images; nothing was "
                          f"written")


def _fine_tune(ctx, record: StudentRecord, model: torch.nn.Module) -> float:
    """`clipdistill train`'s loop over the (wrapped or plain) student, built now that compression has
    rewrapped it: a fresh Adam over its parameters, the cosine schedule of the fine-tune's config, and
    the teaching mode the run recorded (choosing one here would time a quantized student). Returns
    the test accuracy, the student left in eval mode."""
    from ..distill.teaching import TeachingChoice
    from ..distill.trainer import Trainer

    trainer = Trainer(ctx, optimizer=torch.optim.Adam(model.parameters(), lr=ctx.cfg.lr),
                      teaching=TeachingChoice(record.teaching) if record.teaching else None)
    model.train()
    trainer.fit()
    model.eval()
    return _accuracy(ctx)


def _load_best(ctx, record: StudentRecord, run: RunDir) -> torch.nn.Module:
    """The run's best student (and its head) in `ctx`, in eval mode and the plain memory format
    (Model Optimizer's sparsity refuses channels-last)."""
    return ctx.load_checkpoint(record, run.best).to(memory_format=torch.contiguous_format).eval()


def _control(cfg: CompressConfig, run: RunDir, record: StudentRecord) -> float:
    """The same fine-tune without compression: a student that has not converged gains from a
    few more epochs whether or not it is quantized, so the compressed accuracy is compared with
    this one, not only with the checkpoint's."""
    folder = run.path / f"compress-{cfg.mode}-control"
    shutil.rmtree(folder, ignore_errors=True)
    ctx = _context(cfg, folder)
    return _fine_tune(ctx, record, _load_best(ctx, record, run))


def compress(cfg: CompressConfig) -> dict:
    mtq, mts = modelopt()
    t0 = time.time()
    run = RunDir(cfg.run)
    fine_tune = run.path / f"compress-{cfg.mode}"
    shutil.rmtree(fine_tune, ignore_errors=True)  # never resumed: Model Optimizer's wrappers are rebuilt each time
    ctx = _context(cfg, fine_tune)
    if "test" not in ctx.data.names:
        raise MissingSplitError(f"--run {cfg.run}: compress measures accuracy on labelled test images, and this "
                                f"run has none", "test")
    record = checkpoint.read_student(run.best)
    model = _load_best(ctx, record, run)
    result: dict = {"mode": cfg.mode, "run": str(run), "student": ctx.cfg.student,
                    "dense_fp32_accuracy": _accuracy(ctx)}
    log.info("%s: test accuracy %.2f%% (fp32, dense)", run, result["dense_fp32_accuracy"])
    if cfg.control:
        result["control_fp32_accuracy"] = _control(cfg, run, record)
        log.info("the same %d-epoch fine-tune without compression: %.2f%%", cfg.epochs,
                 result["control_fp32_accuracy"])

    if cfg.mode in ("qat", "ptq"):
        rows = ctx.train_rows.take(np.random.default_rng(cfg.seed).permutation(len(ctx.train_rows))
                                   [: cfg.calib_images])

        from ..data.pixels import to_float
        from ..distill.augment import identity_views

        def calibrate(m) -> None:
            for i in range(0, len(rows), 64):
                imgs, _, _ = ctx.data.gather(rows.take(np.arange(i, min(i + 64, len(rows)))))
                x = to_float(imgs.to(ctx.device))
                m(ctx.student_pixels(x, identity_views(len(x)), None))

        with torch.no_grad():
            mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=calibrate)
        result["ptq_accuracy"] = _accuracy(ctx)
        log.info("INT8 after calibration (PTQ): %.2f%%", result["ptq_accuracy"])
    else:
        mts.sparsify(model, "sparse_magnitude")
        result["pruned_accuracy"] = _accuracy(ctx)
        log.info("2:4 after magnitude pruning: %.2f%%", result["pruned_accuracy"])

    if cfg.mode != "ptq":
        result["fine_tune"] = {"epochs": cfg.epochs, "lr": ctx.cfg.lr}
        result["fine_tuned_accuracy"] = _fine_tune(ctx, record, model)
        log.info("after %d fine-tune epochs at lr %g: %.2f%%", cfg.epochs, ctx.cfg.lr,
                 result["fine_tuned_accuracy"])
    if cfg.mode == "sparse24":
        mts.export(model)  # masks baked into the weights: a plain module with zeros where they belong
        result["sparsity"] = {k: v for k, v in sparsity_24(model).items() if k != "sparse"}

    # The ONNX file: the student with its head, as `export` writes it, from the compressed weights.
    loaded, _ = load_student(cfg.run, "best", cache_dir=cfg.cache_dir)
    loaded.module.encoder = model
    loaded.module.eval()  # the graph exported is the eval-mode one, whatever the steps above left
    info = loaded.info
    x, where = parity_inputs(loaded, record.config, 16, cfg.cache_dir)
    with torch.no_grad():
        reference = loaded.module(torch.from_numpy(x)).numpy()
    out = cfg.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    envelope = 2 * rounding_envelope(loaded.module, torch.from_numpy(x), reference) if cfg.mode != "sparse24" else 0.0
    with converted(loaded.module, x, reference, out.parent, "compress", "torchscript", cfg.opset, cfg.tolerance,
                   f" ({cfg.mode})", envelope=envelope) as onnx_file:
        tmp_path, exp, parity = onnx_file.path, onnx_file.exporter, onnx_file.parity
        test = ctx.outs.datasets["test"]
        imgs = test.pixels(info["trained_size"])
        onnx_acc, _ = onnx_accuracy(onnx_file.session, prepare(imgs, info["input"]), np.asarray(test.targets))
        result["onnx_accuracy"] = onnx_acc
        check_test_agreement(result, len(test.targets))
        import onnx

        graph = onnx.load(str(tmp_path)).graph
        ops = [n.op_type for n in graph.node]
        result["onnx_ops"] = {"QuantizeLinear": ops.count("QuantizeLinear"),
                              "DequantizeLinear": ops.count("DequantizeLinear"), "Conv": ops.count("Conv")}
        if cfg.mode == "sparse24":
            from onnx import numpy_helper

            fr = [fraction_24(numpy_helper.to_array(t)) for t in graph.initializer if len(t.dims) in (2, 4)]
            result["onnx_initializers_2to4"] = sum(f == 1.0 for f in fr if f is not None)
        precision = "int8-qdq" if cfg.mode != "sparse24" else "fp32-2:4"
        # the engine for batches 1 to --bundle-batch, precision flags per form (deploy/tensorrt.py)
        trt = {**info, "precision": precision}
        info = {**info, "format": info.get("format", FORMAT), "precision": precision, "exporter": exp,
                "parity": {**parity, "inputs": where}, "compression": result,
                "trtexec": trtexec_command(tmp_path, trt, cfg.bundle_batch, shown=out.name),
                "tensorrt": requirements(tmp_path, trt),
                "accuracy": {"onnx_test_accuracy": onnx_acc, "source": f"ONNX Runtime CPU, {test.name} test"}}
        write(tmp_path, out, info)
    result["bundle"] = write_for(cfg, [out])
    result.update({"path": str(out), "trtexec": info["trtexec"], "seconds": round(time.time() - t0, 1)})
    atomic.write_json(out.with_suffix(".result.json"), result)
    log.info("wrote %s (%s): test accuracy %.2f%% in ONNX Runtime; on a TensorRT machine: %s", out, precision,
             onnx_acc, info["trtexec"])
    return result


def text(res: dict, cfg: CompressConfig | None = None) -> str:
    """The accuracies along the way, and the command that builds the file with TensorRT."""
    keys = [k for k in ("dense_fp32_accuracy", "control_fp32_accuracy", "ptq_accuracy", "pruned_accuracy",
                        "fine_tuned_accuracy", "onnx_accuracy") if k in res]
    return (f"{res['path']}: " + ", ".join(f"{k.replace('_accuracy', '').replace('_', ' ')} {res[k]:.2f}%"
                                           for k in keys) + f"\nTensorRT: {res['trtexec']}")
