"""The deployment bundle (issue 25): export writes MODEL.bundle/ beside the ONNX file, with per runtime
the files it reads, and every one is checked with the field's own tools: polygraphy lints each ONNX
file, OpenCV DNN runs what it loads against ONNX Runtime, Triton's protobuf parses its configs,
jetson-inference's preprocessing is emulated on real test images, DeepStream's formula is applied to
its config's numbers, timm loads its folder. Reuses the suite's trained runs and export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clipdistill.core.errors import ConfigError


@pytest.fixture(scope="module")
def bundle(exported):
    from clipdistill.deploy.bundle import bundle_path

    folder = bundle_path(exported["fp32"])
    assert exported["result"]["bundle"] == str(folder)
    return folder


@pytest.fixture(scope="module")
def test_images(trained_run, exported):
    """At least 200 real test images of the trained run, at its trained side, with labels."""
    from clipdistill.core.atomic import read_json
    from clipdistill.deploy.run_images import split_images

    side = read_json(exported["fp32"].with_suffix(".json"))["trained_size"]
    imgs, labels = split_images(read_json(trained_run / "config.json"), "test", "", side)
    return imgs[:256], labels[:256]


@pytest.fixture(scope="module")
def checked(bundle, test_images):
    from clipdistill.deploy.bundle import check_bundle

    return check_bundle(bundle, test_images[0])


def test_export_writes_a_bundle_with_every_runtime_and_a_manifest(bundle, exported):
    from clipdistill.deploy.bundle import sha256
    from clipdistill.deploy.targets import TARGETS

    man = json.loads((bundle / "manifest.json").read_text())
    assert man["targets"] == TARGETS.names() and man["batch"] == 8
    assert man["models"] == [exported["fp32"].name, exported["int8"].name]
    for rel in ("jetson/model.onnx", "jetson/labels.txt", "deepstream/config_infer_primary_clipdistill.txt",
                "deepstream/student.probs.onnx", "deepstream/labels_deepstream.txt", "triton/student/config.pbtxt",
                "triton/student/1/model.onnx", "triton/student_int8/config.pbtxt", "opencv/predict_opencv.py",
                "timm/config.json", "timm/README.md", "timm/model.safetensors", "labels.txt", "README.md"):
        assert rel in man["files"], rel
        assert man["files"][rel]["sha256"] == sha256(bundle / rel)
    assert (bundle / "student.onnx").read_bytes() == exported["fp32"].read_bytes()
    for p in [bundle, *bundle.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
    readme = (bundle / "README.md").read_text()
    assert "have not been run on the machines" in readme and "--input_blob=input_0" in readme
    # ONNX Runtime's INT8 file is not for OpenCV, and the README says why: OpenCV 5 refuses it
    # (`bufidx >= 0`); 4.14 loads it and runs it far from ONNX Runtime
    said = "not for OpenCV DNN: ONNX Runtime's CPU INT8 form"
    row = next(ln for ln in readme.splitlines() if ln.startswith("| OpenCV DNN (cv2.dnn.readNetFromONNX) | "
                                                                  "`student.int8.onnx` |"))
    assert said in row, row


def test_every_check_passes_on_every_file(checked):
    bad = {k: v for kind in ("files", "targets") for k, v in checked[kind].items() if v}
    assert checked["passed"] and not bad, bad  # no skip either: polygraphy, tritonclient, OpenCV, timm are here
    assert len([f for f in checked["files"] if f.endswith(".onnx")]) == 6


def test_polygraphy_lints_a_broken_file_as_failing(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from clipdistill.deploy.bundle import polygraphy_lint

    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"], name="bad_add")], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    p = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    problem = polygraphy_lint(p, tmp_path)
    assert problem and "1 failing nodes" in problem and "Incompatible dimensions" in problem


def test_jetson_file_agrees_with_predict_on_real_images(bundle, test_images):
    """jetson-inference's preprocessing (nearest stretch, /255, ImageNet mean/std, planar RGB) through the
    jetson file against predict's (Pillow bilinear, our mean/std) through the fp32 file."""
    from clipdistill.data.shapes10 import SPLITS, generate
    from clipdistill.deploy.bundle import _context
    from clipdistill.deploy.targets import jetson

    ctx = _context(bundle, ["student.onnx"], 8)
    imgs, labels = test_images
    at_side = jetson.measure(ctx, imgs, labels)
    assert at_side["images"] >= 200 and at_side["top1_agreement"] >= 99.0, at_side
    assert at_side["accuracy_jetson_nearest"] == at_side["accuracy_predict_bilinear"]
    # Larger frames: the nearest stretch is where jetson-inference and predict part (measured, not a bar)
    big, big_labels = generate("test", 256, 72, SPLITS["test"].seed)
    larger = jetson.measure(ctx, big, big_labels)
    print(f"\njetson: at {at_side['network_side']} px {at_side}\njetson: 72 px frames {larger}")
    assert 0 <= larger["top1_agreement"] <= 100
    lines = (bundle / "jetson" / "labels.txt").read_text().splitlines()
    assert lines[0].startswith("n00000000 ") and len(lines) == 10


def test_jetson_adapter_is_the_research_notes_affine():
    from clipdistill.deploy.onnx_edit import normalisation_map
    from clipdistill.deploy.targets.jetson import IMAGENET_MEAN, IMAGENET_STD

    scale, bias = normalisation_map(IMAGENET_MEAN, IMAGENET_STD, [0.5] * 3, [0.25] * 3)
    np.testing.assert_allclose(scale, [0.916, 0.896, 0.900], atol=1e-6)
    np.testing.assert_allclose(bias, [-0.06, -0.176, -0.376], atol=1e-6)


def test_deepstream_formula_on_the_configs_numbers_is_our_tensor(bundle, test_images):
    from clipdistill.deploy.inputs import prepare
    from clipdistill.deploy.targets.deepstream import formula_input, read_config

    c = read_config(bundle / "deepstream" / "config_infer_primary_clipdistill.txt")
    assert float(c["net-scale-factor"]) == pytest.approx(1 / (255 * 0.25), rel=1e-12)
    assert c["offsets"] == "127.5;127.5;127.5" and c["network-type"] == "1" and c["scaling-filter"] == "1"
    assert c["classifier-threshold"] == "0"  # a labels run has no reject threshold: documented default
    spec = json.loads((bundle / "student.json").read_text())["input"]
    y = formula_input((float(c["net-scale-factor"]), [float(v) for v in c["offsets"].split(";")]), test_images[0])
    assert np.abs(y - prepare(test_images[0], spec)).max() <= 1e-5
    (line,) = (bundle / "deepstream" / "labels_deepstream.txt").read_text().splitlines()
    assert len(line.split(";")) == 10
    assert "student.int8.onnx skipped" in (bundle / "README.md").read_text()  # ORT's uint8 form: no TensorRT


def test_deepstream_bakes_a_per_channel_std_into_the_graph(exported, tmp_path):
    """CLIP's per-channel std: one scalar net-scale-factor cannot say it, so the graph normalises."""
    from clipdistill.deploy.bundle import check_bundle, write_bundle
    from clipdistill.deploy.targets.deepstream import read_config

    src = tmp_path / "clipnorm.onnx"
    shutil.copyfile(exported["fp32"], src)
    info = json.loads(exported["fp32"].with_suffix(".json").read_text())
    info["input"].update(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
    src.with_suffix(".json").write_text(json.dumps(info))
    write_bundle([src], tmp_path / "b", ["deepstream", "opencv"], 4)
    c = read_config(tmp_path / "b" / "deepstream" / "config_infer_primary_clipdistill.txt")
    assert (c["net-scale-factor"], c["offsets"]) == ("1", "0;0;0")
    assert "blobFromImagesWithParams" in (tmp_path / "b" / "opencv" / "predict_opencv.py").read_text()
    res = check_bundle(tmp_path / "b")
    assert res["targets"] == {"deepstream": [], "opencv": []}, res["targets"]


def test_triton_config_parses_with_tritons_protobuf(bundle):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((bundle / "triton" / "student" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("student", "onnxruntime", 8)
    assert list(cfg.input[0].dims) == [3, 32, 32] and list(cfg.output[0].dims) == [10]
    assert cfg.output[0].label_filename == "labels.txt"


def test_opencv_loads_fp32_agrees_and_refuses_ort_int8(bundle, test_images):
    from clipdistill.deploy.bundle import _context
    from clipdistill.deploy.targets import opencv

    r = opencv.measure(_context(bundle, ["student.onnx", "student.int8.onnx"], 8), test_images[0])
    print(f"\nopencv: {json.dumps(r)}")
    assert r["blob_max_abs_diff"] <= 1e-5
    assert r["files"]["student.onnx"]["loads"] and r["files"]["student.onnx"]["max_abs_diff"] <= 1e-4
    # ONNX Runtime's CPU INT8 form is never offered to OpenCV: 5 refuses it; 4 loads it and runs it far
    # from ONNX Runtime (69.9% top-1 agreement with 4.14 on these images)
    q = r["files"]["student.int8.onnx"]
    assert q["not_for_opencv"] and not q["listed_as_loading"]
    assert not q["loads"] or q["top1_agreement"] < 0.95, q


def test_timm_folder_is_described_as_ours(bundle):
    cfg = json.loads((bundle / "timm" / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    assert not {"tag", "hf_hub_id", "url", "origin_url"} & set(pc)
    assert (pc["crop_mode"], pc["crop_pct"], pc["mean"], pc["license"]) == ("squash", 1.0, [0.5] * 3, "other")
    assert len(cfg["label_names"]) == 10
    card = (bundle / "timm" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\nlicense: other\ntags:\n- image-classification\n- timm\n")


def test_an_embedding_students_head_snippet_runs(embedding_run, tmp_path):
    """The card's code applies head.safetensors and gives the ONNX file's logits (timm alone + the head)."""
    from clipdistill.deploy.export import ExportConfig, export
    from clipdistill.deploy.targets.timm_folder import timm_logits

    res = export(ExportConfig(run=str(embedding_run), out=str(tmp_path / "e.onnx"), bundle="timm,jetson",
                              parity_images=4, threads=1))
    b = tmp_path / "e.bundle"
    assert res["bundle"] == str(b) and (b / "timm" / "head.safetensors").is_file()
    assert "load_file" in (b / "timm" / "README.md").read_text()
    from clipdistill.deploy.bundle import check_bundle

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    from clipdistill.deploy.targets._common import run_onnx

    assert np.abs(timm_logits(b / "timm", x) - run_onnx(tmp_path / "e.onnx", x)).max() <= 1e-3
    assert check_bundle(b)["passed"]
    from clipdistill.data.shapes10 import SPLITS, generate
    from clipdistill.deploy.bundle import _context
    from clipdistill.deploy.targets import jetson

    ctx = _context(b, ["e.onnx"], 8)
    for side in (32, 72):  # the trained side, and larger frames that jetson-inference stretches by nearest
        imgs, labels = generate("test", 400, side, SPLITS["test"].seed)
        r = jetson.measure(ctx, imgs, labels)
        print(f"\njetson (embedding student): {r}")
        assert side != 32 or r["top1_agreement"] >= 99.0


def test_check_bundle_catches_a_changed_file_and_the_cli_says_so(bundle, tmp_path, capsys):
    from clipdistill.cli import main
    from clipdistill.deploy.bundle import write_bundle

    copy = tmp_path / "b"  # the jetson target alone: two files to lint, each a polygraphy process (~3 s)
    write_bundle([bundle / "student.onnx"], copy, ["jetson"], 1)
    assert main(["check-bundle", str(copy), "--images", "0"]) == 0
    out = capsys.readouterr().out
    assert "pass  jetson" in out and "PASSED" in out
    (copy / "jetson" / "labels.txt").write_text("cat\n")
    assert main(["check-bundle", str(copy), "--images", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  jetson/labels.txt" in out and "differs from the manifest" in out and "FAIL  jetson" in out


def test_check_bundle_asks_each_model_again_for_the_answers_recorded_where_it_was_written(bundle, exported, tmp_path,
                                                                                          capsys):
    """The bundle keeps probe images (the run's own test images, at the network's side) and each model's
    outputs on them; check-bundle runs every model again on them, as it would on the device. Here, on
    the machine that wrote them, both files give their answers back; the INT8 file shipped in the fp32
    file's place (manifest re-hashed, as a hand-made copy would be) fails the fp32 tolerance on its own
    line, and answers no longer given (the INT8 file's recorded top-1 moved) fail that file."""
    from clipdistill.cli import main
    from clipdistill.deploy.bundle import MANIFEST, hashes, write_bundle

    fp32, int8 = exported["fp32"].name, exported["int8"].name
    copy = tmp_path / "b"
    write_bundle([bundle / fp32, bundle / int8], copy, [], 1)
    man = json.loads((copy / MANIFEST).read_text())
    assert {"probe.npy", "answers.json"} <= set(man["files"])
    probe = np.load(copy / "probe.npy", allow_pickle=False)
    rec = json.loads((copy / "answers.json").read_text())
    side = json.loads(exported["fp32"].with_suffix(".json").read_text())["input"]["size"]
    assert probe.shape == (16, side, side, 3) and probe.dtype == np.uint8 and probe.std() > 10
    assert rec["images"].startswith("16 test images of ") and set(rec["models"]) == {fp32, int8}
    assert main(["check-bundle", str(copy), "--images", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("(CPU) here: top-1 as recorded on 16 of 16 probe images, max |diff| 0 ") == 2, out

    def rehashed():
        man["files"] = hashes(copy)
        (copy / MANIFEST).write_text(json.dumps(man))

    (copy / fp32).write_bytes((copy / int8).read_bytes())
    rehashed()
    assert main(["check-bundle", str(copy), "--images", "0"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {fp32}" in out and "an fp32 file must stay within 0.001 of its outputs' scale" in out
    assert f"pass  {int8}" in out

    (copy / fp32).write_bytes((bundle / fp32).read_bytes())
    rec["models"][int8]["top1"] = [(t + 1) % 10 for t in rec["models"][int8]["top1"]]
    (copy / "answers.json").write_text(json.dumps(rec))
    rehashed()
    assert main(["check-bundle", str(copy), "--images", "0"]) == 1
    out = capsys.readouterr().out
    assert f"pass  {fp32}" in out and f"FAIL  {int8}" in out
    assert "top-1 as recorded on 0 of 16 probe images" in out and "must keep top-1 on 90% of them" in out


def test_bundle_flag_is_checked_against_the_registry(trained_run):
    from clipdistill.deploy.bundle import target_names
    from clipdistill.deploy.export import ExportConfig

    with pytest.raises(ConfigError, match=r"--bundle: unknown bundle target 'jetsn'; valid: .*jetson"):
        ExportConfig(run=str(trained_run), bundle="jetson,jetsn")
    assert target_names("none") == [] and target_names("triton, jetson") == ["triton", "jetson"]
