"""Compression for TensorRT on the CPU: INT8 Q/DQ (PTQ, QAT) and 2:4 sparsity with NVIDIA
Model Optimizer, checked in PyTorch and in the exported ONNX; the TensorRT-only paths say they
are skipped here; the prepared GPU script's CPU form runs. How much QAT wins back on depthwise
students is measured by benchmarks/compress_students.py (README), not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("modelopt.torch.quantization")

ROOT = Path(__file__).resolve().parents[1]


def test_fraction_24_counts_groups_along_input_channels():
    from clipdistill.deploy.compress import fraction_24

    w = np.ones((2, 8, 3, 3), np.float32)
    assert fraction_24(w) == 0.0
    w[:, 0::4] = 0
    w[:, 1::4] = 0  # two zeros in each group of four input channels, at every kernel position
    assert fraction_24(w) == 1.0
    w[0, 1, 1, 1] = 5.0  # one group breaks the pattern
    assert fraction_24(w) == pytest.approx(1 - 1 / (2 * 9 * 2))
    assert fraction_24(np.ones((4, 3, 3, 3))) is None  # 3 input channels: stays dense


def _boundary_net():
    """Two fake-quantized 1x1 convolutions where the first one's output lands exactly on a
    rounding boundary of the second one's INT8 input (3.0 with a step of 2.0: 1.5 steps)."""
    import modelopt.torch.quantization as mtq
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.Conv2d(1, 1, 1, bias=False))
    with torch.no_grad():
        for c in net:
            c.weight.fill_(1.0)
    mtq.quantize(net, mtq.INT8_DEFAULT_CFG, forward_loop=lambda m: m(torch.full((1, 1, 2, 2), 127.0)))
    net[1].input_quantizer.amax = torch.tensor(254.0)  # step 2.0
    return net.eval()


def test_rounding_envelope_measures_a_boundary_flip_and_parity_allows_only_that():
    """Why compress allows Q/DQ graphs PyTorch's own spread: an activation on a rounding
    boundary moves a whole INT8 step when a kernel sums in another order, and so does the output."""
    import torch

    from clipdistill.deploy.compress import rounding_envelope
    from clipdistill.deploy.parity import ParityError, check_parity

    net = _boundary_net()
    on, off = torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 4.0)
    with torch.no_grad():
        ref_on, ref_off = net(on).numpy(), net(off).numpy()
    assert ref_on.max() == 4.0  # 1.5 steps round (half to even) to 2 steps of 2.0
    env = rounding_envelope(net, on, ref_on)
    assert env == pytest.approx(2.0)  # a nudge below the boundary rounds to 1 step: one whole step less
    assert rounding_envelope(net, off, ref_off) < 1e-4  # 2.0 steps, nowhere near a boundary: the nudge alone
    info = check_parity(ref_on, ref_on - 2.0, 1e-2, envelope=env)
    assert info["rounding_envelope"] == env
    with pytest.raises(ParityError, match="own spread"):
        check_parity(ref_on, ref_on - 2.5, 1e-2, envelope=env)  # more than one step: a wrong graph
    with pytest.raises(ParityError):
        check_parity(ref_on, ref_on - 2.0, 1e-2)  # without the envelope, the flip alone is refused


@pytest.fixture(scope="module")
def compressed(embedding_run, tmp_path_factory):
    import shutil

    from clipdistill.deploy.compress import CompressConfig, compress

    run = tmp_path_factory.mktemp("compress") / "run"
    shutil.copytree(embedding_run, run)
    return {m: compress(CompressConfig(run=str(run), mode=m, epochs=1, calib_images=128, max_images=600,
                                       control=m == "qat", progress=False))
            for m in ("qat", "sparse24")}


def test_qat_exports_qdq_onnx_that_onnxruntime_runs(compressed):
    import onnxruntime as ort

    r = compressed["qat"]
    assert r["onnx_ops"]["QuantizeLinear"] > 10 and r["onnx_ops"]["DequantizeLinear"] >= r["onnx_ops"]["Conv"]
    # PTQ, QAT and the ONNX file are measured, and the ONNX file computes what PyTorch's fake quantization does
    for k in ("dense_fp32_accuracy", "ptq_accuracy", "fine_tuned_accuracy", "onnx_accuracy"):
        assert 0 <= r[k] <= 100
    assert abs(r["onnx_accuracy"] - r["fine_tuned_accuracy"]) <= 1.0
    # the deployment bundle beside it (issue 25): OpenCV DNN loads the Q/DQ file, DeepStream builds it as INT8
    from clipdistill.deploy.bundle import check_bundle

    assert r["bundle"] == str(Path(r["path"]).with_name("model.qat.bundle"))
    res = check_bundle(r["bundle"])
    assert res["passed"], res
    assert "network-mode=1" in (Path(r["bundle"]) / "deepstream" / "config_infer_primary_clipdistill.txt").read_text()
    assert r["dense_fp32_accuracy"] > 20  # a (briefly) trained student, chance 10%...
    assert r["fine_tuned_accuracy"] > r["dense_fp32_accuracy"] - 5  # ...keeps what it learnt
    # no --lr: the fine-tune runs at a third of the rate the run was trained at
    from clipdistill.distill.rundir import RunDir

    assert r["fine_tune"] == {"epochs": 1, "lr": pytest.approx(RunDir(r["run"]).read_config()["lr"] / 3)}
    # --control: the same fine-tune without quantization really ran, beside the run
    ctl = Path(r["run"]) / "compress-qat-control"
    epochs = [json.loads(line) for line in (ctl / "metrics.jsonl").read_text().splitlines() if "val_accuracy" in line]
    assert [e["epoch"] for e in epochs] == [1] and 0 <= r["control_fp32_accuracy"] <= 100
    sess = ort.InferenceSession(r["path"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["clipdistill"])
    assert meta["precision"] == "int8-qdq" and "--int8" in meta["trtexec"]
    assert meta["compression"]["ptq_accuracy"] == r["ptq_accuracy"]


def test_a_test_accuracy_gap_beyond_rounding_is_refused():
    from clipdistill.deploy.compress import check_test_agreement
    from clipdistill.deploy.parity import ParityError

    check_test_agreement({"fine_tuned_accuracy": 60.0, "onnx_accuracy": 60.9}, 2000)
    check_test_agreement({"ptq_accuracy": 60.0, "onnx_accuracy": 62.5}, 100)  # a small split: up to 3 images
    with pytest.raises(ParityError, match="within 1.00 points on 2000 images"):
        check_test_agreement({"fine_tuned_accuracy": 60.0, "onnx_accuracy": 58.5}, 2000)


def test_control_needs_a_fine_tune(embedding_run):
    from clipdistill.core.errors import ConfigError
    from clipdistill.deploy.compress import CompressConfig

    with pytest.raises(ConfigError, match="control"):
        CompressConfig(run=str(embedding_run), mode="ptq", control=True)


def test_sparse24_pattern_holds_in_pytorch_and_onnx(compressed):
    import onnx
    from onnx import numpy_helper

    from clipdistill.deploy.compress import fraction_24

    r = compressed["sparse24"]
    assert r["sparsity"]["layers_2to4"] >= r["sparsity"]["eligible_layers"] - 2 > 5
    weights = [numpy_helper.to_array(t) for t in onnx.load(r["path"]).graph.initializer if len(t.dims) in (2, 4)]
    fr = [fraction_24(w) for w in weights]
    assert sum(f == 1.0 for f in fr if f is not None) == r["onnx_initializers_2to4"] >= r["sparsity"]["layers_2to4"]
    assert "--sparsity=enable" in r["trtexec"]
    assert r["onnx_accuracy"] > r["dense_fp32_accuracy"] - 5


def test_tensorrt_paths_report_themselves_skipped_here(compressed, tmp_path):
    """No TensorRT on these machines: bench says so for each compressed file, and measures nothing."""
    import shutil

    if shutil.which("trtexec"):
        pytest.skip("trtexec is installed here: the row is measured, not skipped")
    from clipdistill.deploy.bench import BenchConfig, bench

    res = bench(BenchConfig(model=[compressed["qat"]["path"], compressed["sparse24"]["path"]],
                            backend=["trtexec", "ort-trt"], iters=2, warmup=1, out=str(tmp_path / "b.json")))
    assert len(res["records"]) == 4
    for rec in res["records"]:
        assert rec["skipped"] and rec["fps"] is None, rec
    assert any("trtexec is not on PATH" in rec["skipped"] for rec in res["records"])


def test_gpu_check_dry_run_runs_its_cpu_parts(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every part of the prepared GPU script at toy sizes on the CPU."""
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["device"] == "CPU (dry run)"
    assert all(r["img_per_s"] > 0 for r in out["training_and_embedding"])
    assert sum("tar-shard pool (pixel store" in r["what"] for r in out["training_and_embedding"]) == 1
    assert all(r["throughput_ratio"] > 0 for r in out["inference"])
    assert "NCCL torchrun smoke run needs CUDA; skipped here" in proc.stdout
