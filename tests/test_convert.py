"""hwtool convert --to ort: the .ort loads, matches the ONNX model, and comes with its operator config."""

from __future__ import annotations

import json

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
