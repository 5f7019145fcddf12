"""`clipdistill bench`: what a model costs at inference, measured the same way for all.

One row per (model, backend): warm-up batches, then timed batches, giving throughput
(images/s), latency per batch (p50, p99) and the model's peak memory. Every row runs in
a fresh process (`python -m clipdistill.bench --worker SPEC`), which records its resident
memory just before the model is loaded, resets the kernel's peak counter, runs, and
reports peak minus baseline — so one model's allocations never inflate the next one's,
and the import of the runtime itself is not counted as the model's. glibc's mmap threshold
is pinned in the worker (MALLOC_MMAP_THRESHOLD_) so freed buffers are returned and the
figure repeats from run to run.

Backends (`--backend`): ort-cpu, ort-cuda, ort-trt (ONNX Runtime execution providers),
torch (the same architecture rebuilt in PyTorch, random weights: speed and memory only),
trtexec (TensorRT's own benchmark: an optimization profile for batches 1 to --batch, run at
--batch, with --fp16, plus --int8 for Q/DQ models, --sparsity=enable for 2:4 ones; its own figures
are parsed). A backend that is not installed is reported as skipped, never estimated, and so is
a file a backend cannot take (the cpu-target INT8 file on TensorRT). The records go to
bench.json; the table and the student/teacher ratios are printed.

Each row says which runtime its file's form is for (deploy/tensorrt.py `FORMS`, read from the
file's metadata): a Q/DQ INT8 file made for TensorRT runs slower than fp32 in ONNX Runtime on a
CPU, and the table says so rather than let it read as a regression. Likewise the ratios: the
offline world's teacher (tiny-shapes) is smaller than the student, so there the student is the
slower one; the ratios say so rather than let it read as distillation not paying off.

Where the records go is settled before anything is measured (`BenchConfig.__post_init__`): a
folder given as --out gets bench.json inside it, and a path that cannot be a file (under a
file, say) is refused at once — not after minutes of measuring, with the table lost."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..core.config import check, option
from ..core.errors import ClipDistillError, ConfigError
from ..core.registry import Registry

log = logging.getLogger(__name__)


DEFAULT_OUT = "bench.json"
# teacher/tiny.py TINY_NAME, spelt out: bench runs on a device install, where importing the teacher
# (torch, open_clip) fails; tests/test_trust_report.py checks that the two agree.
TINY_TEACHER = "tiny-shapes"


@dataclasses.dataclass
class BenchConfig:
    model: list[str] = option(default_factory=list, help="ONNX files to measure: repeat --model FILE (student and "
                                                         "teacher), or comma-separate them", metavar="FILE")
    backend: list[str] = option(default_factory=lambda: ["ort-cpu"],
                                help="backends, comma-separated: ort-cpu, ort-cuda, ort-trt, torch, trtexec")
    batch: int = option(8, "images per batch (the study: 8)")
    size: int = option(0, "input side in pixels; 0 = each model's own (exported) size. Models exported with a fixed "
                          "side run only at it: the study's 224 is `clipdistill export --size 224`")
    warmup: int = option(5, "untimed batches first")
    iters: int = option(50, "timed batches")
    max_seconds: float = option(60.0, "stop timing a row after this long (with at least 5 batches)")
    threads: int = option(0, "CPU threads (ONNX Runtime intra-op, torch); 0 = the runtime's default")
    trt_precision: str = option("fp16", "TensorRT (ort-trt, trtexec) precision for float models; QDQ INT8 models "
                                        "add int8", choices=["fp32", "fp16"])
    out: str = option(DEFAULT_OUT, f"where the records are written; a folder: {DEFAULT_OUT} inside it",
                      metavar="FILE|DIR")

    def __post_init__(self) -> None:
        for b in self.backend:
            BACKENDS.get(b)
        check(bool(self.backend), "backend", "give at least one backend")
        check(self.batch >= 1, "batch", "must be >= 1")
        check(self.size >= 0, "size", "must be >= 0 (0 = the model's own)")
        check(self.warmup >= 0, "warmup", "must be >= 0")
        check(self.iters >= 1, "iters", "must be >= 1")
        check(self.max_seconds > 0, "max_seconds", "must be > 0")
        check(self.threads >= 0, "threads", "must be >= 0")
        self.out = str(records_path(self.out))


def records_path(out: str) -> Path:
    """The file `--out` names: inside it when it is a folder (or ends with a separator). A path
    no file can be written at is refused now, before the measuring (ConfigError naming --out)."""
    path = Path(out)
    check(bool(out), "out", f"give the file to write, e.g. {DEFAULT_OUT}")
    if path.is_dir() or out.endswith(("/", os.sep)):
        path = path / DEFAULT_OUT
        log.info("--out %s is a folder: the records go to %s", out, path)
    check(not path.is_dir(), "out", f"{path} is a folder; give a file name, e.g. {path / DEFAULT_OUT}")
    for parent in path.parents:
        if parent.exists():
            check(parent.is_dir(), "out", f"{parent} is a file, so {path} cannot be written; give another path")
            check(os.access(parent, os.W_OK | os.X_OK), "out", f"{parent} is not writable here; give another path")
            break
    return path


# ----------------------------------------------------------------------------- backends

@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    description: str
    missing: Callable[[], Optional[str]]  # why it cannot run here, or None


def _ort_missing(provider: str) -> Callable[[], Optional[str]]:
    def missing() -> Optional[str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if provider not in ort.get_available_providers():
            return (f"onnxruntime {ort.__version__} here has no {provider} (has: "
                    f"{', '.join(ort.get_available_providers())})")
        return None
    return missing


def _torch_missing() -> Optional[str]:
    import importlib.util

    return None if importlib.util.find_spec("torch") else "torch is not installed"


def _trtexec_missing() -> Optional[str]:
    return None if trtexec_binary() else "trtexec is not on PATH (TensorRT's bin/, e.g. /usr/src/tensorrt/bin)"


def trtexec_binary() -> Optional[str]:
    found = shutil.which("trtexec")
    if found:
        return found
    for p in ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec"):
        if os.access(p, os.X_OK):
            return p
    return None


BACKENDS: Registry[Backend] = Registry("backend", flag="--backend")
BACKENDS.add("ort-cpu", Backend("ort-cpu", "ONNX Runtime, CPU", _ort_missing("CPUExecutionProvider")))
BACKENDS.add("ort-cuda", Backend("ort-cuda", "ONNX Runtime, CUDA", _ort_missing("CUDAExecutionProvider")))
BACKENDS.add("ort-trt", Backend("ort-trt", "ONNX Runtime, TensorRT EP", _ort_missing("TensorrtExecutionProvider")))
BACKENDS.add("torch", Backend("torch", "PyTorch eager (CUDA fp16 when there is a GPU, else CPU fp32)",
                              _torch_missing))
BACKENDS.add("trtexec", Backend("trtexec", "TensorRT's trtexec", _trtexec_missing))


# ----------------------------------------------------------------------------- models

def describe_model(path: str) -> dict:
    """What bench needs to know about an ONNX file: from its sidecar when there is one
    (cheap), else from the file itself (its metadata and input shape)."""
    from .model_file import check_onnx_file
    from .tensorrt import FORMS, form_of, form_of_graph

    p = Path(path)
    check_onnx_file(p)  # a huge file that is not ONNX is refused before onnx.load reads it whole
    side = p.with_suffix(".json")
    meta = {}
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
    dims = None
    form = None
    if not meta:
        import onnx

        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
            raise ConfigError(f"--model {p}: not a readable ONNX file ({type(e).__name__}); give a file written by "
                              f"`clipdistill export`") from None
        props = {q.key: q.value for q in model.metadata_props}
        if "clipdistill" in props:
            meta = json.loads(props["clipdistill"])
        else:
            form = form_of_graph(p)
        inp = model.graph.input[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        input_name = inp.name
    else:
        input_name = meta.get("input", {}).get("name", "input")
    size = meta.get("input", {}).get("size")
    fixed = bool(meta) or (dims is not None and len(dims) == 4 and dims[2] is not None)
    if size is None and dims is not None and len(dims) == 4:
        size = dims[2]
    form = form_of(meta) or form or "fp32"
    return {"path": str(p), "name": meta.get("name", p.stem), "role": meta.get("role", "unknown"),
            "precision": meta.get("precision", "fp32"), "size": size, "fixed_size": fixed,
            "arch": meta.get("arch"), "input_name": input_name,
            "quantization": (meta.get("quantization") or {}).get("target"), "form": form,
            "form_label": FORMS[form].label}


def _row_size(cfg: BenchConfig, m: dict) -> int:
    if m["fixed_size"] and m["size"]:
        if cfg.size and cfg.size != m["size"]:
            raise ConfigError(f"--size {cfg.size}: {m['path']} takes {m['size']} px only (exported with a fixed "
                              f"side); export it at {cfg.size} (`clipdistill export --run RUN --size {cfg.size}`) "
                              f"or leave --size out")
        return int(m["size"])
    return int(cfg.size or m["size"] or 224)


# ----------------------------------------------------------------------------- worker side

def _status_kb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Make VmHWM restart from the current RSS (Linux >= 4.0), so the peak is the model's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> Optional[float]:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux


def _timed(fn: Callable[[], None], warmup: int, iters: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_seconds and len(times) >= 5:
            break
    return times


def _summary(times: list[float], batch: int) -> dict:
    import numpy as np

    t = np.asarray(times) * 1000.0
    return {"fps": batch * len(times) / (float(t.sum()) / 1000.0), "latency_ms_p50": float(np.percentile(t, 50)),
            "latency_ms_p99": float(np.percentile(t, 99)), "latency_ms_mean": float(t.mean()), "iters": len(times)}


def _worker_ort(spec: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    from .runtime import session

    provider = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-trt": "tensorrt"}[spec["backend"]]
    options: dict = {}
    precision = spec["precision"]
    if provider == "tensorrt":
        int8 = spec.get("form") == "int8-qdq"
        options = {"trt_fp16_enable": spec["trt_precision"] == "fp16", "trt_int8_enable": int8}
        precision = "+".join(p for p, on in (("int8", int8), ("fp16", spec["trt_precision"] == "fp16")) if on) \
            or "fp32"
    # Random input of the model's side: speed and memory do not depend on the pixels.
    x = np.random.default_rng(0).standard_normal((spec["batch"], 3, spec["size"], spec["size"]), dtype=np.float32)
    base = _status_kb("VmRSS")
    reset = _reset_peak()
    sess = session(spec["model"], spec["threads"], provider, options)
    name = sess.get_inputs()[0].name
    times = _timed(lambda: sess.run(None, {name: x}), spec["warmup"], spec["iters"], spec["max_seconds"])
    peak = _peak_rss_kb()
    return {**_summary(times, spec["batch"]), "precision": precision, "memory_mb": (peak - base) / 1024.0,
            "memory_kind": "host RSS peak minus baseline" + ("" if reset else " (peak not reset)"),
            "device": "cpu" if provider == "cpu" else "cuda",
            "runtime": f"onnxruntime {ort.__version__} {sess.get_providers()[0]}"}


def _worker_torch(spec: dict) -> dict:
    import torch

    from .deployable import build_module

    # The model library is part of the runtime, not of the model: import it before the baseline.
    __import__("timm" if spec["arch"]["kind"] == "timm" else "open_clip")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    base = _status_kb("VmRSS")
    reset = _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build_module(spec["arch"]).to(dev, dtype=dtype).eval()
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=dev, dtype=dtype)

    def step() -> None:
        with torch.inference_mode():
            model(x)
        if cuda:
            torch.cuda.synchronize()

    times = _timed(step, spec["warmup"], spec["iters"], spec["max_seconds"])
    if cuda:
        mem, kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    else:
        mem, kind = (_peak_rss_kb() - base) / 1024.0, "host RSS peak minus baseline" + ("" if reset else
                                                                                         " (peak not reset)")
    return {**_summary(times, spec["batch"]), "precision": "fp16" if cuda else "fp32", "memory_mb": mem,
            "memory_kind": kind, "device": str(dev), "runtime": f"torch {torch.__version__} eager, random weights"}


def parse_trtexec(text: str) -> dict:
    """Throughput and latency from trtexec's performance summary (its own figures)."""
    thr = re.search(r"Throughput:\s*([\d.eE+-]+)\s*qps", text)
    lat = None
    for label in ("Latency", "GPU Compute Time"):
        m = re.search(rf"\]?\s*{label}:\s*min = .*", text)
        if m:
            lat = m.group(0)
            break
    if not thr or not lat:
        raise ClipDistillError("trtexec printed no performance summary (Throughput/Latency lines); see its log")
    med = re.search(r"median\s*=\s*([\d.eE+-]+)\s*ms", lat)
    p99 = re.search(r"percentile\(99(?:\.0*)?%\)\s*=\s*([\d.eE+-]+)\s*ms", lat)
    gpu = [float(v) for v in re.findall(r"now: CPU \d+ \(MiB\), GPU (\d+) \(MiB\)", text)]
    return {"qps": float(thr.group(1)), "latency_ms_p50": float(med.group(1)) if med else None,
            "latency_ms_p99": float(p99.group(1)) if p99 else None,
            "memory_mb": (max(gpu) - gpu[0]) if len(gpu) >= 2 else None}


def trtexec_bench_flags(spec: dict, dims: Optional[list] = None) -> list[str]:
    """The shape and precision flags of a trtexec row: the profile `trtexec_command` writes for the
    bundle (batches 1 to --batch, from the file's input dims; run at its opt shape, --batch), and
    the form's precision flags (--fp16 only with --trt-precision fp16)."""
    from .tensorrt import FORMS, shape_flags

    if dims is None:
        try:
            from .tensorrt import input_dims

            dims = input_dims(spec["model"])[1]
        except ImportError:  # no onnx on the device: our files have a dynamic batch only
            dims = [None, 3, spec["size"], spec["size"]]
    flags = [f for f in FORMS[spec.get("form") or "fp32"].flags
             if f != "--fp16" or spec["trt_precision"] == "fp16"]
    return shape_flags(spec["input_name"], dims, spec["size"], spec["batch"]) + flags


def _worker_trtexec(spec: dict) -> dict:
    int8 = spec.get("form") == "int8-qdq"
    fp16 = spec["trt_precision"] == "fp16"
    cmd = [trtexec_binary(), f"--onnx={spec['model']}", *trtexec_bench_flags(spec),
           f"--warmUp={max(200, 50 * spec['warmup'])}", f"--iterations={spec['iters']}",
           f"--duration={max(1, int(spec['max_seconds'] // 4))}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=spec["max_seconds"] + 900)
    if proc.returncode != 0:
        raise ClipDistillError(f"trtexec exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    r = parse_trtexec(proc.stdout)
    return {"fps": r["qps"] * spec["batch"], "latency_ms_p50": r["latency_ms_p50"],
            "latency_ms_p99": r["latency_ms_p99"], "memory_mb": r["memory_mb"],
            "memory_kind": "trtexec MemUsageChange GPU peak minus first" if r["memory_mb"] is not None else
            "not reported by trtexec", "precision": "+".join(p for p, on in (("int8", int8), ("fp16", fp16)) if on)
            or "fp32", "device": "cuda", "runtime": "trtexec " + " ".join(cmd[2:])}


WORKERS = {"ort-cpu": _worker_ort, "ort-cuda": _worker_ort, "ort-trt": _worker_ort, "torch": _worker_torch,
           "trtexec": _worker_trtexec}


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[argv.index("--worker") + 1])
    try:
        out = WORKERS[spec["backend"]](spec)
    except Exception as e:  # noqa: BLE001 - reported by the parent with the row it belongs to
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- parent side

def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def _skip_reason(backend: str, m: dict) -> Optional[str]:
    reason = BACKENDS.get(backend).missing()
    if reason:
        return reason
    if backend in ("trtexec", "ort-trt") and m["form"] == "int8-cpu":
        return ("the cpu-target INT8 file is ONNX Runtime's CPU form (uint8 Q/DQ), which TensorRT's parser refuses; "
                "bench the tensorrt-target file (`export --int8 --int8-target tensorrt`) there")
    if backend == "torch":
        if not m["arch"]:
            return "the ONNX file carries no architecture to rebuild in PyTorch (not written by clipdistill export)"
        if m["precision"] != "fp32":
            return f"torch runs the float architecture; the {m['precision']} model is measured with onnxruntime"
    return None


def measure(spec: dict, timeout: float) -> dict:
    """Run one row in a fresh process and return its figures (or {"error": ...})."""
    # glibc otherwise raises its mmap threshold as buffers are freed, keeps later ones on the
    # heap and does not give them back: the same model then measured 390 or 580 MB from run
    # to run. A fixed threshold returns freed buffers, so the peak is what the model holds.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run([sys.executable, "-m", "clipdistill.deploy.bench", "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    return json.loads(lines[-1])


def bench(cfg: BenchConfig) -> dict:
    """Measure every model on every backend; write cfg.out; return records and ratios."""
    check(bool(cfg.model), "model", "give at least one ONNX file, e.g. --model student.onnx --model teacher.onnx")
    models = [describe_model(m) for m in cfg.model]
    sizes = [_row_size(cfg, m) for m in models]
    machine = _machine()
    records = []
    for m, size in zip(models, sizes):
        for backend in cfg.backend:
            rec = {"model": m["path"], "name": m["name"], "role": m["role"], "backend": backend,
                   "batch": cfg.batch, "size": size, "precision": m["precision"], "fps": None,
                   "latency_ms_p50": None, "latency_ms_p99": None, "memory_mb": None, "skipped": None,
                   "error": None, "machine": machine}
            if m["quantization"]:
                rec["int8_target"] = m["quantization"]
            rec["form"], rec["form_label"] = m["form"], m["form_label"]
            reason = _skip_reason(backend, m)
            if reason:
                rec["skipped"] = reason
                log.info("skipped %s for %s: %s", backend, Path(m["path"]).name, reason)
                records.append(rec)
                continue
            spec = {"model": m["path"], "backend": backend, "batch": cfg.batch, "size": size,
                    "warmup": cfg.warmup, "iters": cfg.iters, "max_seconds": cfg.max_seconds,
                    "threads": cfg.threads, "arch": m["arch"], "precision": m["precision"],
                    "trt_precision": cfg.trt_precision, "input_name": m["input_name"], "form": m["form"]}
            rec["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            got = measure(spec, timeout=cfg.max_seconds * 3 + 600)
            if "error" in got:
                rec["error"] = got["error"]
                log.warning("failed %s for %s: %s", backend, Path(m["path"]).name, got["error"])
            else:
                rec.update(got)
                log.info("%s [%s, %s, %d px, batch %d]: %.1f img/s, p50 %.1f ms, memory %s MB", Path(m["path"]).name,
                         backend, rec["precision"], size, cfg.batch, rec["fps"], rec["latency_ms_p50"],
                         _fmt(rec["memory_mb"], ".0f"))
            records.append(rec)
    from ..core import atomic

    atomic.write_json(cfg.out, records)
    return {"records": records, "ratios": ratios(records), "out": cfg.out}


def ratios(records: list[dict]) -> list[dict]:
    """Each measured student against the teacher on the same backend and batch (the
    teacher at the same side when there is one)."""
    ok = [r for r in records if r.get("fps")]
    out = []
    for s in (r for r in ok if r["role"] == "student"):
        teachers = [t for t in ok if t["role"] == "teacher" and t["backend"] == s["backend"] and
                    t["batch"] == s["batch"]]
        if not teachers:
            continue
        t = next((t for t in teachers if t["size"] == s["size"]), teachers[0])
        out.append({"student": s["model"], "teacher": t["model"], "teacher_name": t.get("name"),
                    "backend": s["backend"], "batch": s["batch"],
                    "student_size": s["size"], "teacher_size": t["size"], "student_precision": s["precision"],
                    "teacher_precision": t["precision"], "fps_ratio": s["fps"] / t["fps"],
                    "memory_ratio": (t["memory_mb"] / s["memory_mb"]) if s.get("memory_mb") and t.get("memory_mb")
                    else None})
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(records: list[dict]) -> str:
    """The study's deployment table, in Markdown (skipped backends are listed apart)."""
    head = ("| model | role | backend | image size | batch | precision | form (the runtime it is for) | FPS | "
            "latency p50 / p99 (ms) | memory (MB) |")
    lines = [head, "|" + "---|" * 10]
    for r in records:
        if r.get("skipped"):
            continue
        if r.get("error"):
            lines.append(f"| {Path(r['model']).name} | {r['role']} | {r['backend']} | {r['size']} | {r['batch']} | "
                         f"{r['precision']} | {r.get('form_label', '-')} | failed: {r['error'][:80]} | | |")
            continue
        lines.append(f"| {Path(r['model']).name} | {r['role']} | {r['backend']} | {r['size']} | {r['batch']} | "
                     f"{r['precision']} | {r.get('form_label', '-')} | {r['fps']:.1f} | {r['latency_ms_p50']:.1f} / "
                     f"{_fmt(r['latency_ms_p99'], '.1f')} | {_fmt(r['memory_mb'], '.0f')} |")
    return "\n".join(lines)


def skipped_lines(records: list[dict]) -> str:
    seen: dict[tuple, list[str]] = {}
    for r in records:
        if r.get("skipped"):
            seen.setdefault((r["backend"], r["skipped"]), []).append(Path(r["model"]).name)
    return "\n".join(f"- {b} skipped for {', '.join(names)}: {why}" for (b, why), names in seen.items())


def _memory_words(ratio: Optional[float]) -> str:
    if not ratio:
        return ""
    return f", {ratio:.2f}x less memory" if ratio >= 1 else f", {1 / ratio:.2f}x more memory"


def ratio_lines(rs: list[dict]) -> str:
    lines = [f"- {Path(r['student']).name} ({r['student_precision']}, {r['student_size']} px) vs "
             f"{Path(r['teacher']).name} ({r['teacher_precision']}, {r['teacher_size']} px), {r['backend']}, batch "
             f"{r['batch']}: {r['fps_ratio']:.2f}x the throughput{_memory_words(r['memory_ratio'])}" for r in rs]
    return "\n".join(lines + tiny_teacher_notes(rs))


def tiny_teacher_notes(rs: list[dict]) -> list[str]:
    """A line under the ratios when the teacher is the offline world's tiny one: it is smaller than
    the student (an image tower of about 0.4 M parameters at 32 px, resnet10t's is 4.9 M), so the
    student is *slower* here and that is no regression; against a real CLIP teacher (ViT-B-32 at
    224 px) the ratio reverses."""
    tiny = [r for r in rs if r.get("teacher_name") == TINY_TEACHER]
    if not tiny:
        return []
    slower = [r for r in tiny if r["fps_ratio"] < 1]
    return [f"- note: the teacher here is {TINY_TEACHER}, the offline world's stand-in, which is smaller than the "
            f"student" + (f" (so the student is slower: {min(r['fps_ratio'] for r in slower):.2f}x the throughput at "
                          f"worst)" if slower else "")
            + "; it says nothing about speed against a real CLIP teacher (bench one exported with "
              "`clipdistill export --teacher ViT-B-32`), where the student is the fast one"]


# ----------------------------------------------------------------------------- what a person reads

def failures(res: dict) -> list[str]:
    """One line per row that failed (a skipped backend is not a failure): the command exits 1 on
    any, so a script does not take a table of errors for a measurement."""
    return [f"failed: {r['model']} [{r['backend']}]: {r['error']}" +
            (" (a model exported with a fixed batch size needs that --batch)" if "dimension" in r["error"] else "")
            for r in res["records"] if r.get("error")]


def text(res: dict, cfg: Optional[BenchConfig] = None) -> str:
    """The deployment table, the backends skipped and why, the student/teacher ratios, the file."""
    parts = [table(res["records"])]
    if any(r.get("skipped") for r in res["records"]):
        parts.append(skipped_lines(res["records"]))
    if res["ratios"]:
        parts.append("student / teacher:\n" + ratio_lines(res["ratios"]))
    parts.append(f"wrote {res['out']}")
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
