"""QAT wins back what post-training INT8 loses, on a student that post-training INT8 hurts:
MobileNetV3-Small at 64 px, trained with `clipdistill train`'s recipe to about 88% on shapes10
(the teacher's probe: 94%), then compressed as a user would. Long (18 minutes on two
cores): `make test-long`. benchmarks/compress_students.py measures the same over three seeds."""

from __future__ import annotations

import pytest

pytest.importorskip("modelopt.torch.quantization")

pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def depthwise_run(tmp_path_factory, cache_dir, trained_teacher_file):
    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train

    run = tmp_path_factory.mktemp("long") / "mobilenetv3_small_100-64px"
    res = train(TrainConfig(method="kl", head="linear", data=["train", "unlabeled"], student="mobilenetv3_small_100",
                            student_size=64, epochs=30, lr=3e-3, seed=0, pretrained=str(trained_teacher_file),
                            cache_dir=str(cache_dir), out=str(run), progress=False))
    assert res["test_accuracy"] > 80, res  # trained, not a student that never learnt (chance: 10%)
    return run


def test_qat_recovers_what_ptq_loses_on_a_depthwise_student(depthwise_run):
    from clipdistill.deploy.compress import CompressConfig, compress

    ptq = compress(CompressConfig(run=str(depthwise_run), mode="ptq", progress=False))
    qat = compress(CompressConfig(run=str(depthwise_run), mode="qat", control=True, progress=False))
    dense = ptq["dense_fp32_accuracy"]
    # the student is one post-training INT8 hurts (the choice: a loss of at least 1 point)...
    assert ptq["onnx_accuracy"] <= dense - 1.0, ptq
    # ...and the QAT file, in ONNX Runtime, is within 0.5 points of the fp32 student or above it
    assert qat["onnx_accuracy"] >= dense - 0.5, qat
    # the same fine-tune without quantization moves the student too (its best checkpoint is
    # picked on 100 validation images): QAT stays within the noise of two 2,000-image
    # measurements (one standard error each is about 0.65 points at 90%) of that control
    assert qat["onnx_accuracy"] >= qat["control_fp32_accuracy"] - 2.0, qat
