"""Compression for TensorRT on the CPU: INT8 Q/DQ (PTQ, QAT) and 2:4 sparsity with NVIDIA
Model Optimizer, checked in PyTorch and in the exported ONNX. The accuracy QAT wins back on a
depthwise student is measured by benchmarks/compress_students.py (README), not here."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("modelopt.torch.quantization")


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


@pytest.fixture(scope="module")
def compressed(embedding_run, tmp_path_factory):
    import shutil

    from clipdistill.deploy.compress import CompressConfig, compress

    run = tmp_path_factory.mktemp("compress") / "run"
    shutil.copytree(embedding_run, run)
    return {m: compress(CompressConfig(run=str(run), mode=m, epochs=1, calib_images=128, max_images=600,
                                       progress=False))
            for m in ("qat", "sparse24")}


def test_qat_exports_qdq_onnx_that_onnxruntime_runs(compressed):
    import onnxruntime as ort

    r = compressed["qat"]
    assert r["onnx_ops"]["QuantizeLinear"] > 10 and r["onnx_ops"]["DequantizeLinear"] >= r["onnx_ops"]["Conv"]
    # PTQ, QAT and the ONNX file are measured, and the ONNX file computes what PyTorch's fake quantization does
    for k in ("dense_fp32_accuracy", "ptq_accuracy", "fine_tuned_accuracy", "onnx_accuracy"):
        assert 0 <= r[k] <= 100
    assert abs(r["onnx_accuracy"] - r["fine_tuned_accuracy"]) <= 1.0
    assert r["dense_fp32_accuracy"] > 20  # a (briefly) trained student, chance 10%...
    assert r["fine_tuned_accuracy"] > r["dense_fp32_accuracy"] - 5  # ...keeps what it learnt
    sess = ort.InferenceSession(r["path"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["clipdistill"])
    assert meta["precision"] == "int8-qdq" and "--int8" in meta["trtexec"]


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
