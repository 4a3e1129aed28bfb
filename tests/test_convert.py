"""hwtool convert --to ort: the .ort loads, matches the ONNX model, and comes with its operator config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_errors import one_line_error
from click.testing import CliRunner
from highway_onnx import Spec, build, images

from hwtool.cli import main


def _run(path, x: np.ndarray, ort_format: bool = False) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    if ort_format:
        opts.add_session_config_entry("session.load_model_format", "ORT")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _convert(model, *extra) -> dict:
    res = CliRunner().invoke(main, ["convert", str(model), "--to", "ort", *map(str, extra), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _check_matches(model, ort_path, x):
    want, got = _run(model, x), _run(ort_path, x, ort_format=True)
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("target", ["portable", "arm", "amd64"])
def test_hand_built_model_converts_and_matches(tmp_path, target):
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(16, 16, 32))), model)
    r = _convert(model, "--target", target)
    ort_path, config = tmp_path / "m.ort", tmp_path / "m.required_operators.config"
    assert r["output"] == str(ort_path) and r["config"] == str(config) and r["target"] == target
    assert ort_path.stat().st_size == r["ort_bytes"] > 0
    assert r["max_abs_diff"] <= 1e-4 and r["nodes"] > 0
    _check_matches(model, ort_path, images(5, seed=2))

    # The config is what a reduced ONNX Runtime build reads: "domain;opset;Op1,Op2" lines.
    lines = [ln for ln in config.read_text().splitlines() if ln and not ln.startswith("#")]
    ops = {op for ln in lines for op in ln.split(";")[2].split(",")}
    assert all(ln.count(";") == 2 for ln in lines)
    assert any(ln.startswith("ai.onnx;") for ln in lines)
    assert {"Conv", "FusedConv"} & ops and "Gemm" in ops
    assert str(ort_path) in config.read_text()  # names the published model, not a temporary file
    assert r["operators"] == {";".join(ln.split(";")[:2]): sorted(ln.split(";")[2].split(",")) for ln in lines}
    # amd64 may keep NCHWc blocked layouts; portable and arm must not.
    if target != "amd64":
        assert "ReorderInput" not in ops and "ReorderOutput" not in ops


def test_an_ort_file_given_for_a_model_is_named_for_what_it_is(tmp_path):
    """hwtool's own .ort output, given to eval, bench or prune, was "not a readable ONNX model
    (DecodeError); re-export it"."""
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(16, 16, 32))), model)
    _convert(model)
    np.save(tmp_path / "c.npy", images(4))
    ort_file = str(tmp_path / "m.ort")
    calib = ["--calib", str(tmp_path / "c.npy")]
    for args in (
        ["bench", str(model), ort_file],
        ["prune", ort_file, *calib],
        ["gates", ort_file, *calib],
        ["quantize", ort_file, "-o", str(tmp_path / "q.onnx"), *calib],
        ["eval", ort_file, "--data", str(tmp_path / "c.npy")],
    ):
        line = one_line_error(CliRunner().invoke(main, args))
        assert "ONNX Runtime's own format (.ort" in line and "pass the .onnx it was converted from" in line


def test_exported_model_converts_and_matches(tiny_onnx_dynamo, tmp_path):
    out = tmp_path / "tiny.ort"
    r = _convert(tiny_onnx_dynamo, "-o", out)
    assert r["max_abs_diff"] <= 1e-4
    _check_matches(tiny_onnx_dynamo, out, images(3, seed=4))
    assert (tmp_path / "tiny.required_operators.config").is_file()


def test_quantized_model_converts_and_matches(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(16, 32))), model)
    calib = tmp_path / "c.npy"
    np.save(calib, images(16))
    q = tmp_path / "q.onnx"
    assert CliRunner().invoke(main, ["quantize", str(model), "-o", str(q), "--calib", str(calib)]).exit_code == 0
    r = _convert(q, "--target", "arm")
    assert r["max_abs_diff"] <= 1e-4
    _check_matches(q, tmp_path / "q.ort", images(4, seed=5))
    text = (tmp_path / "q.required_operators.config").read_text()
    assert "QuantizeLinear" in text or "QLinearConv" in text


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(8,))), model)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    res = CliRunner().invoke(main, ["convert", str(model), "-o", str(tmp_path / "m.onnx2")])
    assert ".ort" in one_line_error(res)
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "missing.onnx")])
    assert "does not exist" in one_line_error(res)
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "junk.onnx")])
    assert "ONNX" in one_line_error(res)
    res = CliRunner().invoke(main, ["convert", str(model), "--to", "tflite"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "m.onnx"]


# ---------------------------------------------------------------------------------------------
# --to float16


def _float16(model, *extra) -> dict:
    res = CliRunner().invoke(main, ["convert", str(model), "--to", "float16", *map(str, extra), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _elem(v) -> int:
    return v.type.tensor_type.elem_type


@pytest.mark.parametrize("half_io", [False, True], ids=["float32 io", "float16 io"])
def test_float16_halves_the_file_and_follows_the_float32_model(tmp_path, half_io):
    """Weights and computation in float16, inputs and outputs float32 unless --half-io; the reported
    differences are the ones ORT gives on the calibration inputs; a weight float16 cannot hold is
    counted (clamped, or flushed to 0); the result converts on to the ORT format."""
    from onnx import numpy_helper

    model = build(Spec(widths=(16, 32)))
    fc = next(t for t in model.graph.initializer if t.dims == [10, 32])
    w = numpy_helper.to_array(fc).copy()
    w[0, 0], w[0, 1] = 1e-9, 7e4  # under float16's smallest step, over its largest value
    fc.CopyFrom(numpy_helper.from_array(w, fc.name))
    path, out = tmp_path / "m.onnx", tmp_path / "m16.onnx"
    onnx.save(model, path)
    x = images(32, seed=3)
    np.save(tmp_path / "calib.npy", x)
    r = _float16(path, "-o", out, "--calib", tmp_path / "calib.npy", *(["--half-io"] if half_io else []))
    assert r["half_io"] == half_io and r["verify_samples"] == 32 and r["clamped"] == 1 and r["flushed"] == 1
    assert r["bytes_after"] == out.stat().st_size < 0.55 * path.stat().st_size
    half = onnx.load(out)
    onnx.checker.check_model(half, full_check=True)
    io = onnx.TensorProto.FLOAT16 if half_io else onnx.TensorProto.FLOAT
    assert _elem(half.graph.input[0]) == io and _elem(half.graph.output[0]) == io
    assert {t.data_type for t in half.graph.initializer if t.data_type in (1, 10)} == {onnx.TensorProto.FLOAT16}
    want = _run(path, x)[0]
    got = _run(out, x.astype(np.float16) if half_io else x)[0].astype(np.float32)
    diff = float(np.abs(got.astype(np.float64) - want).max())
    assert r["max_abs_diff"] == pytest.approx(diff, rel=1e-6, abs=1e-9)
    assert 0 < r["max_rel_diff"] < 0.2  # close, not exact (and one weight clamped from 7e4 to 65504)
    assert r["top1_agreement"] == float((got.argmax(1) == want.argmax(1)).mean())
    ort_out = _convert(out, "-o", tmp_path / "m16.ort")
    assert ort_out["max_abs_diff"] <= 1e-2


def test_float16_of_a_pruned_export_without_calibration(tiny_onnx_dynamo, tmp_path):
    pruned = tmp_path / "p.onnx"
    res = CliRunner().invoke(main, ["prune", str(tiny_onnx_dynamo), "--no-refit", "-o", str(pruned)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["convert", str(pruned), "--to", "float16"])
    assert res.exit_code == 0, res.output
    assert "on 2 random samples" in res.stdout and "top-1 agreement" in res.stdout
    out = tmp_path / "p.fp16.onnx"  # the default name
    x = images(16, seed=8)
    np.testing.assert_allclose(_run(out, x)[0], _run(pruned, x)[0], atol=0.05, rtol=0.02)


def test_float16_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(16,))), model)
    np.save(tmp_path / "c.npy", images(8))
    q, half = tmp_path / "q.onnx", tmp_path / "h.onnx"
    assert (
        CliRunner().invoke(main, ["quantize", str(model), "-o", str(q), "--calib", str(tmp_path / "c.npy")]).exit_code
        == 0
    )
    _float16(model, "-o", half)
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = {
        (q, "--to", "float16"): "is quantized (int8); convert the float32 model",
        (half, "--to", "float16"): "is already float16",
        (model, "--to", "float16", "--target", "arm"): "--target is for --to ort",
        (model, "--half-io"): "--half-io is for --to float16",
        (model, "--calib", tmp_path / "c.npy"): "--calib is for --to float16",
        (model, "--to", "float16", "--calib", tmp_path / "missing.npy"): "does not exist",
        (model, "--to", "float16", "-o", model): "",
        (model, "--to", "float16", "-o", tmp_path / "h.ort"): "name the float16 ONNX model .onnx",
    }
    for args, needle in cases.items():
        res = CliRunner().invoke(main, ["convert", *map(str, args)])
        assert needle in one_line_error(res), args
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_quantize_works_after_float16_in_the_same_process(tmp_path):
    """The float16 converter's import put ORT's transformers folder on sys.path and hwtool took it
    off again, so onnxruntime.quantization, imported later, could not find its modules."""
    code = (
        "import numpy as np, onnx, sys; sys.path.insert(0, 'tests');"
        "from highway_onnx import Spec, build, images;"
        "from hwtool.convert import half_model;"
        "m = build(Spec(widths=(16,))); half_model(m);"
        "from hwtool.quantize import quantize_model;"
        "quantize_model(m, images(8)); print('ok')"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_float16_converts_weights_held_in_constant_nodes(tmp_path):
    """Some exporters keep weights in Constant nodes, not initializers: they are weights too."""
    model = build(Spec())
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    nodes += list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "c.onnx"))
    np.save(tmp_path / "x.npy", images(4))
    res = CliRunner().invoke(
        main, ["convert", str(tmp_path / "c.onnx"), "--to", "float16", "--calib", str(tmp_path / "x.npy"),
               "-o", str(tmp_path / "h.onnx"), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["weights"] > 1000 and rep["top1_agreement"] == 1.0
    half = onnx.load(str(tmp_path / "h.onnx"))
    kinds = {a.t.data_type for n in half.graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims}
    assert onnx.TensorProto.FLOAT16 in kinds
    line = one_line_error(CliRunner().invoke(main, ["convert", str(tmp_path / "h.onnx"), "--to", "float16"]))
    assert "already float16" in line


def test_a_model_with_all_its_tensors_external_converts_to_ort(tmp_path):
    """Even its small tensors (a torch export's shapes and scalars) stored outside, which ONNX
    Runtime's own reading of the file refuses: convert hands it the model as read."""
    source = Path(__file__).parents[1] / "models" / "small-gated.onnx"
    model = onnx.load(str(source))
    onnx.save(model, str(tmp_path / "e.onnx"), save_as_external_data=True, location="e.data", size_threshold=0)
    rep = _convert(tmp_path / "e.onnx", "-o", tmp_path / "e.ort")
    assert rep["max_abs_diff"] < 1e-4
    _check_matches(source, tmp_path / "e.ort", images(2))


def _init_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.data_type in (1, 10)}


def test_float16_converts_weights_that_are_also_graph_inputs(tmp_path):
    """An export with keep_initializers_as_inputs lists every weight as a graph input too; ONNX
    Runtime's converter leaves graph inputs float32, so no weight was converted (the file 0.99x)."""
    model = build(Spec(widths=(16, 32)))
    for t in model.graph.initializer:
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    path, out = tmp_path / "k.onnx", tmp_path / "k16.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    r = _float16(path, "-o", out)
    assert path.read_bytes() == before  # the input is left as it was
    assert r["bytes_after"] == out.stat().st_size < 0.55 * len(before)
    half = onnx.load(out)
    assert _init_types(half) == {onnx.TensorProto.FLOAT16}
    assert [i.name for i in half.graph.input] == ["input"] and r["float_inputs"] == ["input"]
    x = images(8, seed=6)
    np.testing.assert_allclose(_run(out, x)[0], _run(path, x)[0], atol=0.05, rtol=0.02)


def test_float16_model_keeps_float16_weights_in_its_ort_file(tmp_path):
    """At ORT_ENABLE_ALL, ONNX Runtime folded the casts before float16 ops into float32 weights: the
    .ort of a float16 model was larger than the float32 model's."""
    from hwtool.convert import ort_initializers

    path, half = tmp_path / "m.onnx", tmp_path / "m16.onnx"
    onnx.save(build(Spec(widths=(32, 64))), path)
    _float16(path, "-o", half)
    r32, r16 = _convert(path, "-o", tmp_path / "m.ort"), _convert(half, "-o", tmp_path / "m16.ort")
    assert r32["optimization"] == "all" and r16["optimization"] == "extended"
    counts = ort_initializers(tmp_path / "m16.ort")
    weights = sum(int(np.prod(t.dims)) for t in onnx.load(half).graph.initializer if t.data_type == 10)
    assert counts.get(onnx.TensorProto.FLOAT16, 0) >= 0.95 * weights
    assert counts.get(onnx.TensorProto.FLOAT, 0) < 0.01 * weights
    assert r16["ort_bytes"] < 0.7 * r32["ort_bytes"]
    assert r16["max_abs_diff"] <= 1e-3
    _check_matches(half, tmp_path / "m16.ort", images(3, seed=7))


def test_ort_file_that_lost_float16_is_refused(tmp_path, monkeypatch):
    """Should an ONNX Runtime optimize a float16 model's weights back to float32 at the level used,
    convert says so instead of writing a .ort larger than the float32 model's."""
    import hwtool.convert

    monkeypatch.setattr(hwtool.convert, "HALF_LEVEL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    path = tmp_path / "h.onnx"
    onnx.save(hwtool.convert.half_model(build(Spec(widths=(16, 32)))), path)
    res = CliRunner().invoke(main, ["convert", str(path), "--to", "ort"])
    assert "turned the float16 weights" in one_line_error(res)
    assert [p.name for p in tmp_path.iterdir()] == ["h.onnx"]


def test_nan_weights_are_refused_before_converting(tmp_path):
    """A NaN weight made every output NaN, and the .ort was written with 'max abs diff nan'."""
    from onnx import numpy_helper

    model = build(Spec(widths=(16,)))
    fc = next(t for t in model.graph.initializer if t.dims == [10, 16])
    w = numpy_helper.to_array(fc).copy()
    w[0, 0] = np.nan
    fc.CopyFrom(numpy_helper.from_array(w, fc.name))
    onnx.save(model, tmp_path / "n.onnx")
    for fmt in ("ort", "float16"):
        res = CliRunner().invoke(main, ["convert", str(tmp_path / "n.onnx"), "--to", fmt])
        assert f"NaN or infinite weights (1 in '{fc.name}')" in one_line_error(res), fmt
    assert [p.name for p in tmp_path.iterdir()] == ["n.onnx"]


def test_ort_verification_refuses_outputs_it_cannot_vouch_for(tmp_path):
    """NaN outputs (here sqrt(x - 2) of inputs in [0, 1)) compare as 'nan', which passed; so did a
    large difference. The .ort must then not be written."""
    from hwtool.convert import TOLERANCE, compare_outputs
    from hwtool.runtime import ModelError

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Sub", ["x", "two"], ["d"]), onnx.helper.make_node("Sqrt", ["d"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "s.onnx")
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "s.onnx"), "--to", "ort"])
    assert "output 'y' is NaN or infinite on random inputs" in one_line_error(res)
    assert [p.name for p in tmp_path.iterdir()] == ["s.onnx"]

    a = np.array([[1.0, -50.0]], np.float32)
    ids = np.array([3, 1])
    assert compare_outputs(["y", "c"], [a, ids], [a + 2.0**-10, ids.copy()]) == 2.0**-10  # exact in float32
    bad = {
        "differs from the ONNX model's by": [a + np.float32(60 * TOLERANCE), ids],  # 1.2x the allowed 50 * TOLERANCE
        "by nan": [np.array([[1.0, np.nan]], np.float32), ids],
        "output 'c' differs from the ONNX model's in 50.0%": [a, np.array([3, 2])],
        "has shape [2, 1]": [a.reshape(2, 1), ids],
    }
    for needle, got in bad.items():
        with pytest.raises(ModelError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            compare_outputs(["y", "c"], [a, ids], got)


def test_float16_of_a_model_that_outputs_class_ids(tmp_path):
    """Its output is int64 (an ArgMax at the end): only the float input stays float32, no float
    output is there to measure a difference on, and the ids are compared by agreement."""
    model = build(Spec(widths=(16, 32)))
    model.graph.node.append(onnx.helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("cls", onnx.TensorProto.INT64, ["N"]))
    path, out = tmp_path / "ids.onnx", tmp_path / "ids16.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "x.npy", images(16, seed=9))
    r = _float16(path, "-o", out, "--calib", tmp_path / "x.npy")
    assert r["float_inputs"] == ["input"] and r["float_outputs"] == []
    assert r["max_abs_diff"] is None and r["max_rel_diff"] is None
    x = images(16, seed=9)
    agree = float((_run(out, x)[0] == _run(path, x)[0]).mean())
    assert r["integer_agreement"] == r["top1_agreement"] == agree > 0.8
    assert _elem(onnx.load(out).graph.output[0]) == onnx.TensorProto.INT64
    assert _convert(out, "-o", tmp_path / "ids16.ort")["max_abs_diff"] == 0.0  # no float output; ids equal


def test_float16_message_names_the_float_inputs_and_outputs(tmp_path):
    """A class-id model's message said 'inputs and outputs float32' of its int64 output and gave a
    'max abs diff 0.00e+00' measured on no output at all (and later a traceback, once that was None)."""
    model = build(Spec(widths=(16,)))
    model.graph.node.append(onnx.helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("cls", onnx.TensorProto.INT64, ["N"]))
    onnx.save(model, tmp_path / "ids.onnx")
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "ids.onnx"), "--to", "float16"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())  # rich wraps long lines
    assert "float32 inputs and outputs: input" in text and "cls" not in text
    assert "no float output to compare" in text and "max abs diff" not in text
    assert re.search(r"top-1 agreement \d+\.\d\d%, integer outputs agree on \d+\.\d\d%$", text)
    args = ["convert", str(tmp_path / "ids.onnx"), "--to", "float16", "-o", str(tmp_path / "b.onnx"), "--half-io"]
    res = CliRunner().invoke(main, args)
    assert "float16 inputs and outputs: input" in " ".join(res.stdout.split())
