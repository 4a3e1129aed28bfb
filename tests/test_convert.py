"""hwtool convert --to ort: the .ort loads, matches the ONNX model, and comes with its operator config."""

from __future__ import annotations

import json
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
