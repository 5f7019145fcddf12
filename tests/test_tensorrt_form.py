"""TensorRT's form (issue 25): the `tensorrt` INT8 target writes what TensorRT's ONNX parser takes
(int8 only, zero points present and 0, no INT32 bias DequantizeLinear, no Q/DQ between Conv and
Relu nor on the graph output), a checker of those rules fails on the old form and on the cpu
target's file, trtexec commands carry an optimization profile from the file's own input, each
file says the oldest TensorRT/JetPack it needs, and `compress --opset 13` writes TensorRT 8.2's
opset. No TensorRT runs here: the rules are those of its parser's source (deploy/tensorrt.py).
Reuses the suite's trained runs and export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipdistill.core.errors import ConfigError
from clipdistill.deploy import tensorrt as trt


@pytest.fixture(scope="module")
def forms(trained_run, exported, tmp_path_factory) -> dict:
    """The tensorrt target's file (export, seconds), and the old form rebuilt through the same
    quantize function with ONNX Runtime's defaults put back (INT32 bias, Q/DQ on every output)."""
    from clipdistill.core.atomic import read_json
    from clipdistill.deploy.export import ExportConfig, export
    from clipdistill.deploy.quantize import quantize_int8
    from clipdistill.deploy.run_images import calibration_images

    folder = tmp_path_factory.mktemp("trt")
    res = export(ExportConfig(run=str(trained_run), out=str(folder / "m.onnx"), int8=True, int8_target="tensorrt",
                              calib_images=64, threads=1))
    info = read_json(exported["fp32"].with_suffix(".json"))
    calib = calibration_images(read_json(trained_run / "config.json"), info, 32, "")
    old = folder / "old.int8-tensorrt.onnx"
    quantize_int8(exported["fp32"], old, calib, "tensorrt",
                  overrides={"QuantizeBias": True, "OpTypesToExcludeOutputQuantization": []})
    return {"fp32": Path(res["path"]), "new": Path(res["int8"]["path"]), "result": res, "old": old,
            "cpu": exported["int8"]}


def test_export_int8_tensorrt_writes_a_bundle_that_passes_every_check(forms, trained_run):
    """The issue's acceptance, as a user runs it: `export --int8 --int8-target tensorrt` writes the
    bundle (both files, every runtime) and every check passes on every file in it."""
    from clipdistill.core.atomic import read_json
    from clipdistill.deploy.bundle import bundle_path, check_bundle
    from clipdistill.deploy.run_images import split_images

    folder = bundle_path(forms["result"]["path"])
    assert forms["result"]["bundle"] == str(folder)
    side = read_json(forms["fp32"].with_suffix(".json"))["trained_size"]
    images, _ = split_images(read_json(trained_run / "config.json"), "test", "", side)
    res = check_bundle(folder, images[:256])
    assert res["passed"], res
    assert set(res["targets"]) == {"jetson", "deepstream", "triton", "tensorrt", "opencv", "timm"}
    engines = json.loads((folder / "tensorrt" / "engines.json").read_text())
    assert {Path(p["file"]).name for p in engines["files"] if p["for_tensorrt"]} == {"m.onnx", "m.int8-tensorrt.onnx"}


def _graph(path):
    import onnx

    return onnx.load(str(path)).graph


def test_the_tensorrt_target_writes_the_parsers_form_and_keeps_accuracy(forms):
    q = forms["result"]["int8"]
    assert q["target"] == "tensorrt" and q["within_bound"]  # the export's own --max-drop check passed
    assert q["extra_options"]["QuantizeBias"] is False
    assert q["tensorrt_qdq_check"].startswith("passed")  # quantize refuses a file that breaks the rules
    g = _graph(forms["new"])
    producer = {o: n.op_type for n in g.node for o in n.output}
    assert producer[g.output[0].name] == "Gemm"  # a float op makes the output, not a DequantizeLinear
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") > 10 and "Relu" in ops
    assert trt.qdq_problems(forms["new"]) == []
    assert trt.qdq_problems(forms["new"], "8.5") == []
    # only the standard domain is imported (ONNX Runtime's pre-processing declares its own)
    import onnx

    assert [o.domain for o in onnx.load(str(forms["new"])).opset_import] in ([""], ["ai.onnx"])


def test_the_checker_fails_on_the_old_form_and_on_the_cpu_target(forms):
    old = trt.qdq_problems(forms["old"])
    assert any("INT32" in p for p in old)
    assert any("graph output 'output' is produced by DequantizeLinear" in p for p in old)
    assert any("between Conv" in p and "Relu" in p for p in old)
    g = _graph(forms["old"])
    assert {n.op_type for n in g.node if n.output[0] == g.output[0].name} == {"DequantizeLinear"}
    cpu = trt.qdq_problems(forms["cpu"])
    assert any("UINT8" in p for p in cpu) and any("zero point not all 0" in p for p in cpu)


def test_the_checker_reads_each_rule(tmp_path):
    """One broken Q/DQ per rule on a tiny graph (zero point missing, per-axis on an activation, a
    scale of 0, a foreign op, an opset past the release)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(nodes, inits, name, opset=13, out="y"):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(path))
        return path

    s, z = np.float32(0.1), np.int8(0)
    ok = save([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("Relu", ["d"], ["y"])],
              {"s": np.array(s), "z": np.array(z)}, "ok")
    assert trt.qdq_problems(ok) == []
    assert any("opset 17" in p and "parses opsets 7 to 13" in p
               for p in trt.qdq_problems(save([helper.make_node("Relu", ["x"], ["y"])], {}, "op17", 17), "8.2"))
    two = save([helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "s"], ["d"]), helper.make_node("Relu", ["d"], ["y"])],
               {"s": np.array(s)}, "two")
    assert sum("no zero point" in p for p in trt.qdq_problems(two)) == 2
    axis = save([helper.make_node("QuantizeLinear", ["x", "s4", "z4"], ["q"], axis=1),
                 helper.make_node("DequantizeLinear", ["q", "s4", "z4"], ["d"], axis=1),
                 helper.make_node("Relu", ["d"], ["y"])],
                {"s4": np.full(4, s), "z4": np.zeros(4, np.int8)}, "axis")
    assert any("per-axis scales on an activation" in p for p in trt.qdq_problems(axis))
    zero = save([helper.make_node("QuantizeLinear", ["x", "s0", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s0", "z"], ["y"])],
                {"s0": np.array(np.float32(0)), "z": np.array(z)}, "zero")
    got = trt.qdq_problems(zero)
    assert any("scale that is not finite and > 0" in p for p in got) and any("graph output" in p for p in got)
    foreign = save([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], {}, "foreign")
    assert any("com.microsoft::Gelu" in p for p in trt.qdq_problems(foreign))


def test_compress_files_pass_the_checker(compressed_ptq13):
    """Model Optimizer's Q/DQ (weights through QuantizeLinear, scales in Constant nodes) is TensorRT's form."""
    assert trt.qdq_problems(compressed_ptq13["path"], "8.2") == []


def test_trtexec_commands_carry_the_files_profile(forms):
    info = json.loads(forms["new"].with_suffix(".json").read_text())
    side = info["input"]["size"]
    cmd = trt.trtexec_command(forms["new"], info, 8)
    assert (f"--minShapes=input:1x3x{side}x{side} --optShapes=input:8x3x{side}x{side} "
            f"--maxShapes=input:8x3x{side}x{side}") in cmd
    assert cmd.startswith(f"trtexec --onnx={forms['new'].name} ") and " --int8 --fp16 " in cmd
    assert cmd.endswith(f"--saveEngine={forms['new'].stem}.b8.engine")
    ten = trt.trtexec_command(forms["new"], info, 4, tensorrt="10")
    assert "--stronglyTyped" in ten and "--int8" not in ten and "--maxShapes=input:4x3x" in ten
    fp32 = trt.trtexec_command(forms["fp32"], json.loads(forms["fp32"].with_suffix(".json").read_text()), 8)
    assert " --fp16 " in fp32 and "--int8" not in fp32 and "--optShapes=input:8x3x" in fp32
    assert trt.trtexec_command(forms["new"], {**info, "precision": "fp32-2:4"}, 2).count("--sparsity=enable") == 1
    with pytest.raises(ValueError, match="ONNX Runtime on a CPU"):
        trt.trtexec_command(forms["cpu"], json.loads(forms["cpu"].with_suffix(".json").read_text()), 8)
    # a static file (jetson-inference's batch 1) takes no shapes: trtexec refuses them for it
    import onnx

    from clipdistill.deploy import onnx_edit

    static = forms["fp32"].with_name("static.onnx")
    onnx.save(onnx_edit.fix_batch(onnx_edit.load(forms["fp32"]), 1), str(static))
    assert "Shapes" not in trt.trtexec_command(static, {"precision": "fp32", "input": info["input"]}, 8)


def test_bench_builds_the_same_profile_and_says_which_runtime_each_form_is_for(forms, tmp_path):
    from clipdistill.deploy.bench import BenchConfig, bench, describe_model, table, trtexec_bench_flags

    spec = {"model": str(forms["new"]), "input_name": "input", "size": 32, "batch": 8, "form": "int8-qdq",
            "trt_precision": "fp16"}
    assert trtexec_bench_flags(spec) == ["--minShapes=input:1x3x32x32", "--optShapes=input:8x3x32x32",
                                         "--maxShapes=input:8x3x32x32", "--int8", "--fp16"]
    assert trtexec_bench_flags({**spec, "form": "fp32", "trt_precision": "fp32"})[-1].startswith("--maxShapes")
    assert {describe_model(str(forms[k]))["form"] for k in ("fp32", "new", "cpu")} == {"fp32", "int8-qdq",
                                                                                        "int8-cpu"}
    res = bench(BenchConfig(model=[str(forms["new"]), str(forms["cpu"])], backend=["ort-cpu"], iters=2, warmup=0,
                            threads=1, out=str(tmp_path / "b.json")))
    text = table(res["records"])
    assert "QDQ INT8 (TensorRT's form; runs slower in ONNX Runtime on a CPU" in text
    assert "INT8 U8S8 (ONNX Runtime CPU)" in text and "form (the runtime it is for)" in text


def test_version_requirements_on_real_files(forms, compressed_ptq13, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    r = trt.requirements(forms["fp32"], json.loads(forms["fp32"].with_suffix(".json").read_text()))
    assert (r["tensorrt"], r["jetpack"]) == ("8.5", "5.1") and "opset 17" in r["why"]
    r = trt.requirements(forms["new"])  # no sidecar given: the form from the graph
    assert r["form"] == "int8-qdq" and r["tensorrt"] == "8.5" and "Xavier or Orin" in r["device"]
    r = trt.requirements(compressed_ptq13["path"])
    assert (r["tensorrt"], r["jetpack"]) == ("8.2", "4.6") and "opset 13" in r["why"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    ln = helper.make_graph([helper.make_node("LayerNormalization", ["x", "w"], ["y"])], "g", [x],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                           [helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0] * 4)])
    onnx.save(helper.make_model(ln, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "ln.onnx"))
    r = trt.requirements(tmp_path / "ln.onnx", {"precision": "fp32"})
    assert (r["tensorrt"], r["jetpack"]) == ("8.6", "6.0") and r["why"].startswith("LayerNormalization")
    onnx.save(helper.make_model(ln, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "o21.onnx"))
    assert trt.requirements(tmp_path / "o21.onnx")["tensorrt"] is None
    r = trt.requirements(forms["fp32"], {"precision": "fp32-2:4"})
    assert "Orin" in r["device"]


def test_the_bundles_tensorrt_target(forms, tmp_path):
    from clipdistill.deploy.bundle import check_bundle, write_bundle

    folder = tmp_path / "b"
    write_bundle([forms["fp32"], forms["new"], forms["cpu"]], folder, ["tensorrt"], 4)
    script = (folder / "tensorrt" / "build_engines.sh").read_text()
    assert script.count("trtexec ") == 2 and forms["cpu"].name not in script
    assert f"--onnx={forms['new'].name} " in script and "--maxShapes=input:4x3x" in script
    md = (folder / "tensorrt" / "COMMANDS.md").read_text()
    assert "--stronglyTyped" in md and "TensorRT >= 8.5 (JetPack >= 5.1)" in md and "Not for TensorRT" in md
    readme = (folder / "README.md").read_text()
    assert re.search(rf"\| TensorRT \(trtexec\) \| `{re.escape(forms['cpu'].name)}` \| — \| not for TensorRT", readme)
    assert check_bundle(folder)["targets"]["tensorrt"] == []
    # the cpu target's file offered to TensorRT: refused, saying what it is for
    engines = folder / "tensorrt" / "engines.json"
    plan = json.loads(engines.read_text())
    for p in plan["files"]:
        p["for_tensorrt"] = True
    engines.write_text(json.dumps(plan))
    got = check_bundle(folder)["targets"]["tensorrt"]
    assert any(forms["cpu"].name in p and "ONNX Runtime on a CPU" in p for p in got)


def test_a_bundle_with_the_old_tensorrt_form_fails_its_check(forms, tmp_path):
    from clipdistill.deploy.bundle import check_bundle, write_bundle

    old = tmp_path / "old.int8-tensorrt.onnx"
    shutil.copyfile(forms["old"], old)
    shutil.copyfile(forms["new"].with_suffix(".json"), old.with_suffix(".json"))  # says: tensorrt target
    write_bundle([old], tmp_path / "b", ["tensorrt"], 8)
    got = check_bundle(tmp_path / "b")["targets"]["tensorrt"]
    assert any("INT32" in p for p in got) and any("graph output" in p for p in got)


# ----------------------------------------------------------------------------- compress --opset

@pytest.fixture(scope="module")
def compressed_ptq13(embedding_run, tmp_path_factory):
    """compress --mode ptq --opset 13 (no fine-tune: 3 s after test_compress, whose cached teacher
    outputs it shares; about 30 s alone)."""
    from clipdistill.deploy.compress import CompressConfig, compress

    run = tmp_path_factory.mktemp("compress13") / "run"
    shutil.copytree(embedding_run, run, ignore=shutil.ignore_patterns("compress-*", "model.*.onnx"))
    return compress(CompressConfig(run=str(run), mode="ptq", opset=13, calib_images=32, max_images=600,
                                   progress=False, bundle="none"))


def test_compress_opset_13_writes_tensorrt_8_2s_opset(compressed_ptq13):
    import onnx

    r = compressed_ptq13
    model = onnx.load(r["path"])
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    meta = json.loads(Path(r["path"]).with_suffix(".json").read_text())
    assert meta["exporter"]["opset"] == 13 and meta["tensorrt"]["tensorrt"] == "8.2"
    assert "--minShapes=input:1x3x" in r["trtexec"] and "--maxShapes=input:8x3x" in r["trtexec"]


def test_compress_opset_is_validated(embedding_run):
    from clipdistill.deploy.compress import CompressConfig

    with pytest.raises(ConfigError, match=r"--opset.*opset 13"):
        CompressConfig(run=str(embedding_run), mode="qat", opset=12)
    with pytest.raises(ConfigError, match="--opset"):
        CompressConfig(run=str(embedding_run), mode="sparse24", opset=5)
    assert CompressConfig(run=str(embedding_run), mode="sparse24", opset=11).opset == 11
    assert CompressConfig(run=str(embedding_run)).opset == 17
