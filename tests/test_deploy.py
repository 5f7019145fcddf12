"""Deployment: export to ONNX (parity with PyTorch, head folding, INT8), predict with ONNX
Runtime alone, and bench's records. Everything runs for real on tiny models: a resnet10t
trained from labels on shapes10 (32 px) and the tiny-shapes teacher with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_subprocess as _cli
from PIL import Image
from test_inputs import _trainer_pixels

from clipdistill.core.errors import ConfigError
from clipdistill.data.shapes10 import CLASSES as SHAPES10_CLASSES
from clipdistill.deploy.export import ExportConfig, export
from clipdistill.deploy.parity import ParityError, check_parity
from clipdistill.distill import checkpoint
from clipdistill.distill.students import create_student

CLASSES = list(SHAPES10_CLASSES)


def _quiet(*a, **k):
    pass


def _test_images(cache_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from clipdistill.data.datasets import create_dataset

    ds = create_dataset("shapes10", "test", str(cache_dir / "data"))
    return ds.data[:n], ds.targets[:n]


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _student_input(images: np.ndarray, size: int) -> torch.Tensor:
    """What the trainer feeds the student for these plain images, at the study's Normalize(0.5, 0.25)."""
    return torch.from_numpy(_trainer_pixels(images, size, 0.5, 0.25))


def _torch_student(run: Path) -> torch.nn.Module:
    record = checkpoint.read_student(run / "checkpoints" / "best.safetensors")
    model = create_student(record.arch, record.num_classes)
    model.load_state_dict(record.weights)
    return model.eval()


# ----------------------------------------------------------------------------- export

def test_student_export_matches_pytorch_on_real_images(trained_run, exported, cache_dir):
    res = exported["result"]
    assert res["parity"]["max_abs_diff"] < 1e-4 and res["parity"]["top1_agreement"] == 100.0
    assert "parity: max abs diff" in exported["stderr"]

    # Independently of the exporter's own check: load both sides and compare, at several batch sizes.
    images, _ = _test_images(cache_dir, 7)
    x = _student_input(images, 32)
    with torch.no_grad():
        ref = _torch_student(trained_run)(x).numpy()
    sess = _session(exported["fp32"])
    name = sess.get_inputs()[0].name
    assert sess.get_inputs()[0].shape[0] == "batch" and sess.get_inputs()[0].shape[1:] == [3, 32, 32]
    for n in (1, 3, 7):
        got = sess.run(None, {name: x[:n].numpy()})[0]
        assert got.shape == (n, 10)
        assert np.abs(got - ref[:n]).max() < 1e-4

    # What a deployment needs travels inside the file and in the sidecar.
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["clipdistill"])
    flat = sess.get_modelmeta().custom_metadata_map
    assert flat["image_size"] == "32" and json.loads(flat["mean"]) == [0.5] * 3
    assert json.loads(flat["std"]) == [0.25] * 3
    assert flat["opset"] == "17" and "dynamo=False" in flat["exporter"]
    assert meta["input"]["size"] == 32 and meta["input"]["resize"] == "stretch"
    assert meta["classes"] == CLASSES and meta["output"] == "logits" and meta["precision"] == "fp32"
    side = json.loads(exported["fp32"].with_suffix(".json").read_text())
    result = json.loads((trained_run / "result.json").read_text())
    record = checkpoint.read_student(trained_run / "checkpoints" / "best.safetensors")
    assert side["classes"] == CLASSES and side["prompts"] == list(record.prompts) and len(side["prompts"]) == 10
    assert side["teacher"]["model"] == "tiny-shapes"
    assert side["accuracy"]["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert side["exporter"]["name"] == "torchscript" and side["exporter"]["opset"] == 17


@pytest.mark.parametrize("head,exporter", [("text", "torchscript"), ("linear", "dynamo")])
def test_embedding_student_has_its_head_folded_in(tmp_path, cache_dir, head, exporter):
    """An "embedding" student's ONNX outputs class logits = head(student(x))."""
    from clipdistill.distill.record import HeadRecord, StudentRecord
    from clipdistill.teacher.heads import TextHead

    torch.manual_seed(0)
    student = create_student("resnet10t", 16).eval()
    th = TextHead(torch.randn(10, 16), 100.0) if head == "text" else torch.nn.Linear(16, 10).eval()
    run = tmp_path / "run"
    checkpoint.write_student(run / "checkpoints" / "best.safetensors", StudentRecord(
        weights=student.state_dict(), output="embedding", num_classes=10, embed_dim=16, size=32, classes=CLASSES,
        prompts=[f"a {c}" for c in CLASSES], teacher={"model": "tiny-shapes", "weights": "test"}, epoch=1,
        head=HeadRecord(head, th.state_dict(), 100.0),
        config={"student": "resnet10t", "student_mean": 0.5, "student_std": 0.25, "dataset": "shapes10",
                "image_size": 32, "data": ["train"], "cache_dir": str(cache_dir), "data_root": None}))
    out = tmp_path / "m.onnx"
    res = export(ExportConfig(run=str(run), out=str(out), exporter=exporter, opset=17 if exporter == "torchscript"
                              else 18, threads=1))
    images, _ = _test_images(cache_dir, 4)
    x = _student_input(images, 32)
    with torch.no_grad():
        ref = th(student(x)).numpy()
    got = _session(out).run(None, {"input": x.numpy()})[0]
    assert got.shape == (4, 10) and np.abs(got - ref).max() < 1e-3
    assert res["info"]["head"] == head and res["info"]["student_output"] == "embedding"
    assert res["info"]["exporter"]["name"] == exporter


def test_parity_check_fails_loudly():
    ref = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    assert check_parity(ref, ref + 1e-6, 1e-3)["max_abs_diff"] < 1e-5
    with pytest.raises(ParityError, match=r"differ by up to 0\.5"):
        check_parity(ref, ref + np.float32(0.5), 1e-3)
    with pytest.raises(ParityError):
        check_parity(ref, ref * np.nan, 1e-3)


def test_teacher_image_encoder_exports_the_same_way(tmp_path, random_teacher_file, trained_run, cache_dir):
    from clipdistill.teacher.openclip_teacher import create_teacher

    out = tmp_path / "teacher.onnx"
    res = export(ExportConfig(teacher="tiny-shapes", pretrained=str(random_teacher_file), out=str(out),
                              cache_dir=str(cache_dir), threads=1))
    info = res["info"]
    assert info["role"] == "teacher" and info["output"] == "embedding" and info["input"]["size"] == 32
    assert info["input"]["resize"] == "shortest-center-crop" and info["input"]["mean"][0] == pytest.approx(0.4814, 1e-3)
    teacher = create_teacher("tiny-shapes", pretrained=str(random_teacher_file), device="cpu", precision="fp32")
    x = torch.randn(3, 3, 32, 32)
    got = _session(out).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - teacher.encode_images(x).numpy()).max() < 1e-4

    # With the run, the run's head (here the linear probe) is folded on: class logits out.
    res = export(ExportConfig(teacher="tiny-shapes", pretrained=str(random_teacher_file), run=str(trained_run),
                              out=str(tmp_path / "t2.onnx"), threads=1))
    assert res["info"]["output"] == "logits" and res["info"]["head"] == "linear"
    assert res["info"]["classes"] == CLASSES
    with pytest.raises(ConfigError, match="--size"):
        export(ExportConfig(teacher="tiny-shapes", pretrained=str(random_teacher_file), size=64,
                            out=str(tmp_path / "t3.onnx")))


def test_export_config_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--run"):
        ExportConfig()
    with pytest.raises(ConfigError, match="--run"):
        ExportConfig(run=str(tmp_path))  # no checkpoints in it
    with pytest.raises(ConfigError, match="--int8"):
        ExportConfig(teacher="ViT-B-32", int8=True)
    with pytest.raises(ConfigError, match="--opset"):
        ExportConfig(teacher="ViT-B-32", exporter="dynamo", opset=17)


# ----------------------------------------------------------------------------- INT8

def _activation_zero_points(path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [init[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in init]


def _weight_scales(path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [init[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
            and init[n.input[0]].dtype == np.int8]


def test_int8_keeps_accuracy_within_a_point(trained_run, exported):
    q = exported["result"]["int8"]
    result = json.loads((trained_run / "result.json").read_text())
    # "before" is the fp32 model through ONNX Runtime: the same as PyTorch's reported accuracy.
    assert q["accuracy_fp32"] == pytest.approx(result["test_accuracy"], abs=0.1)
    assert q["eval_images"] == 2000 and q["calibration"]["images"] == 144  # 9 batches of 16
    assert q["accuracy_fp32"] - q["accuracy_int8"] <= 1.0 and q["within_bound"]
    assert q["agreement_with_fp32"] > 85
    assert "int8 (cpu): test accuracy" in exported["stderr"]
    # QDQ, uint8 activations, int8 weights with one scale per output channel.
    zps = _activation_zero_points(exported["int8"])
    assert zps and all(z.dtype == np.uint8 for z in zps)
    scales = _weight_scales(exported["int8"])
    assert scales and any(s.size > 1 for s in scales)
    assert exported["int8"].stat().st_size < 0.4 * exported["fp32"].stat().st_size
    meta = json.loads(exported["int8"].with_suffix(".json").read_text())
    assert meta["precision"] == "int8" and meta["quantization"]["target"] == "cpu"
    assert meta["accuracy"]["onnx_int8_test_accuracy"] == q["accuracy_int8"]


def test_int8_tensorrt_target_uses_symmetric_int8_activations(trained_run, tmp_path):
    res = export(ExportConfig(run=str(trained_run), out=str(tmp_path / "m.onnx"), int8=True, int8_target="tensorrt",
                              calib_images=32, eval_images=300, threads=1))
    path = Path(res["int8"]["path"])
    assert path.name == "m.int8-tensorrt.onnx" and path.is_file()
    zps = _activation_zero_points(path)
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert res["int8"]["eval_images"] == 300 and res["int8"]["accuracy_int8"] > 0


# ----------------------------------------------------------------------------- predict

def test_predict_a_folder_with_a_corrupt_file_using_onnxruntime_only(exported, trained_run, cache_dir, tmp_path):
    from PIL import Image

    images, _ = _test_images(cache_dir, 3)
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i, im in enumerate(images[:2]):
        Image.fromarray(im).save(folder / f"img{i}.png")
    Image.fromarray(images[2]).save(folder / "more" / "img2.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")

    report = ("heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'open_clip', 'onnx', "
              "'torchvision'})\nprint('HEAVY', json.dumps(heavy), file=sys.stderr)")
    proc = _cli("predict", "--model", str(exported["fp32"]), "--top-k", "3", "--batch-size", "2", "--threads", "1",
                str(folder), code=report)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stderr  # what a Jetson user installs: onnxruntime, numpy, Pillow
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.count(",") == 2 for ln in lines)
    assert "broken.jpg" in proc.stderr and "notes.txt" in proc.stderr and "2 skipped" in proc.stderr

    proc = _cli("predict", "--model", str(exported["fp32"]), "--json", "--threads", "1", str(folder))
    res = json.loads(proc.stdout)
    assert sorted(Path(r["path"]).name for r in res["results"]) == ["img0.png", "img1.png", "img2.png"]
    assert {Path(s["path"]).name for s in res["skipped"]} == {"broken.jpg", "notes.txt"}
    # The same answer as the PyTorch student (32 px PNGs: no resize, so identical inputs).
    with torch.no_grad():
        ref = _torch_student(trained_run)(_student_input(images, 32))
    probs = torch.softmax(ref, 1).numpy()
    by_name = {Path(r["path"]).name: r for r in res["results"]}
    for i, name in enumerate(["img0.png", "img1.png", "img2.png"]):
        top = by_name[name]["top"]
        assert len(top) == 5 and [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
        assert top[0]["class"] == CLASSES[int(probs[i].argmax())]
        assert top[0]["prob"] == pytest.approx(float(probs[i].max()), abs=1e-4)


def test_predict_preprocessing_matches_training_and_the_teacher(random_teacher_file):
    """predict replays the pixels the models saw, with Pillow instead of torch."""
    from PIL import Image

    from clipdistill.data.shapes10 import SPLITS, generate
    from clipdistill.deploy.inputs import clip_input, preprocess, student_input
    from clipdistill.teacher.openclip_teacher import create_teacher

    images = generate("test", 2, 96, SPLITS["test"].seed)[0]
    teacher = create_teacher("tiny-shapes", pretrained=str(random_teacher_file), device="cpu", precision="fp32")
    odd = Image.fromarray(images[0]).resize((70, 50))  # not square: shortest side, then centre crop
    assert np.abs(preprocess(odd, clip_input(teacher.preprocess, 32)) - teacher.preprocess(odd).numpy()).max() < 1e-6
    for size in (32, 224):  # down and up: Pillow's antialiased bilinear vs torch's, within uint8 rounding
        got = preprocess(Image.fromarray(images[1]), student_input(size, 0.5, 0.25))
        ref = _trainer_pixels(images[1:2], size, 0.5, 0.25)[0]
        assert got.shape == (3, size, size) and np.abs(got - ref).max() < 1.5 * (1 / 255) / 0.25


def test_predict_refuses_a_model_without_classes(tmp_path, random_teacher_file, cache_dir):
    from clipdistill.deploy.predict import predict

    out = tmp_path / "t.onnx"
    export(ExportConfig(teacher="tiny-shapes", pretrained=str(random_teacher_file), out=str(out),
                        cache_dir=str(cache_dir), parity_images=2, threads=1))
    with pytest.raises(ConfigError, match="embedding"):
        predict(str(out), [str(tmp_path)], threads=1)


# ----------------------------------------------------------------------------- bench

def test_bench_writes_every_field_for_the_backends_present(exported, trained_run, random_teacher_file, tmp_path):
    teacher = tmp_path / "teacher.onnx"
    export(ExportConfig(teacher="tiny-shapes", pretrained=str(random_teacher_file), run=str(trained_run),
                        out=str(teacher), parity_images=2, threads=1))
    out = tmp_path / "bench.json"
    proc = _cli("bench", "--model", str(exported["fp32"]), "--model", str(exported["int8"]), "--model", str(teacher),
                "--backend", "ort-cpu,torch,ort-cuda", "--iters", "4", "--warmup", "1", "--threads", "1",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert len(records) == 9
    fields = ("model", "backend", "batch", "size", "precision", "fps", "latency_ms_p50", "latency_ms_p99",
              "memory_mb")
    measured = [r for r in records if not r["skipped"]]
    assert {(Path(r["model"]).name, r["backend"]) for r in measured} == {
        ("student.onnx", "ort-cpu"), ("student.int8.onnx", "ort-cpu"), ("teacher.onnx", "ort-cpu"),
        ("student.onnx", "torch"), ("teacher.onnx", "torch")}
    for r in measured:
        assert all(r[f] is not None for f in fields), r
        assert r["batch"] == 8 and r["size"] == 32 and r["fps"] > 0 and r["memory_mb"] > 0
        assert r["latency_ms_p99"] >= r["latency_ms_p50"] > 0
    assert {r["precision"] for r in measured if r["backend"] == "ort-cpu"} == {"fp32", "int8"}
    import onnxruntime as ort

    cuda = [r for r in records if r["backend"] == "ort-cuda"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert all(r["skipped"] and r["fps"] is None for r in cuda)  # reported, not faked
    # torch rebuilds the float architecture only; the INT8 row says why it is not there.
    assert [r for r in records if r["backend"] == "torch" and "int8" in r["model"]][0]["skipped"]
    assert "| student.onnx | student | ort-cpu | 32 | 8 | fp32 |" in proc.stdout
    assert "student / teacher:" in proc.stdout and "x the throughput" in proc.stdout
    # the offline teacher is smaller than the student: the ratios say so (issue 27)
    assert "note: the teacher here is tiny-shapes, the offline world's stand-in" in proc.stdout


def test_bench_refuses_a_size_the_model_was_not_exported_at(exported):
    from clipdistill.deploy.bench import BenchConfig, bench

    with pytest.raises(ConfigError, match="--size 224.*32 px"):
        bench(BenchConfig(model=[str(exported["fp32"])], size=224))
    with pytest.raises(ConfigError, match="--backend"):
        BenchConfig(model=[str(exported["fp32"])], backend=["onnx-gpu"])


TRTEXEC_LOG = """\
[12/04/2022-02:01:20] [I] [MemUsageChange] Init CUDA: CPU +328, GPU +0, now: CPU 347 (MiB), GPU 3458 (MiB)
[12/04/2022-02:01:35] [I] [MemUsageChange] TensorRT-managed allocation in engine deserialization: CPU +0, GPU +44, \
now: CPU 1211 (MiB), GPU 3530 (MiB)
[12/04/2022-02:01:36] [I] === Performance summary ===
[12/04/2022-02:01:36] [I] Throughput: 31.8446 qps
[12/04/2022-02:01:36] [I] Latency: min = 41.1393 ms, max = 41.3042 ms, mean = 41.273 ms, median = 41.2759 ms, \
percentile(90%) = 41.2895 ms, percentile(95%) = 41.2952 ms, percentile(99%) = 41.3042 ms
[12/04/2022-02:01:36] [I] GPU Compute Time: min = 31.0, max = 31.3 ms, mean = 31.1 ms, median = 31.08 ms, \
percentile(99%) = 31.2 ms
"""


def test_trtexec_summary_is_parsed_from_its_own_figures():
    from clipdistill.deploy.bench import parse_trtexec

    r = parse_trtexec(TRTEXEC_LOG)
    assert r["qps"] == pytest.approx(31.8446)
    assert r["latency_ms_p50"] == pytest.approx(41.2759) and r["latency_ms_p99"] == pytest.approx(41.3042)
    assert r["memory_mb"] == 72
    from clipdistill.core.errors import ClipDistillError

    with pytest.raises(ClipDistillError, match="performance summary"):
        parse_trtexec("[E] Error[4]: engine build failed")


def test_teacher_export_with_a_run_refuses_other_weights_than_the_runs(tmp_path, trained_run, trained_teacher_file):
    # trained_run was distilled from the random tiny-shapes file; the pre-trained teacher is other weights.
    with pytest.raises(ConfigError, match="--pretrained"):
        export(ExportConfig(teacher="tiny-shapes", pretrained=str(trained_teacher_file), run=str(trained_run),
                            out=str(tmp_path / "t.onnx"), threads=1))


@pytest.mark.parametrize("verb", ["predict", "bench"])
def test_a_file_that_is_not_onnx_is_named_not_a_traceback(tmp_path, verb):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf")
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    args = ["predict", "--model", str(bad), str(img)] if verb == "predict" else \
        ["bench", "--model", str(bad), "--out", str(tmp_path / "b.json")]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "clipdistill export" in proc.stderr and "Traceback" not in proc.stderr
