"""hwtool quantize: size, accuracy on real CIFAR-10 images, pruned and fixed-batch models, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_errors import one_line_error
from click.testing import CliRunner
from highway_onnx import Spec, build, images, to_float16
from onnx import numpy_helper

from hwtool.cli import main
from hwtool.graph import count_flops, count_parameters
from hwtool.runtime import make_session


def _logits(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fitted(cifar, tmp_path_factory):
    """A conv-heavy highway model whose classifier head is fitted (ridge regression) on real images.

    Random conv features plus a least-squares head reach ~35% on CIFAR-10: a real classifier with
    real margins, made in seconds without torch, so int8 agreement on test images means something.
    """
    model = build(Spec(widths=(32, 64, 64), batch="N"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    train = cifar["train"].head(3000)
    sess = make_session(model, extra_outputs=[gemm.input[0]])
    f = sess.run([gemm.input[0]], {"input": train.as_float()})[0].astype(np.float64)  # (N, C) pooled features
    mu, sd = f.mean(0), f.std(0) + 1e-6
    fn = np.c_[(f - mu) / sd, np.ones(len(f))]
    w = np.linalg.solve(fn.T @ fn + 10 * np.eye(fn.shape[1]), fn.T @ np.eye(10)[train.labels])  # (C+1, 10)
    inits = {t.name: t for t in model.graph.initializer}
    weight = (w[:-1] / sd[:, None]).T.astype(np.float32)  # Gemm has transB=1: (10, C)
    bias = (w[-1] - (mu / sd) @ w[:-1]).astype(np.float32)
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(weight, gemm.input[1]))
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(bias, gemm.input[2]))
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("quant") / "float.onnx"
    onnx.save(model, path)
    return path


def test_int8_is_small_and_agrees_with_float_on_cifar(fitted, cifar, cifar_path, tmp_path):
    before = _sha(fitted)
    out = tmp_path / "int8.onnx"
    args = ["quantize", str(fitted), "-o", str(out), "--data", cifar_path, "--count", "128", "--limit", "1000"]
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert _sha(fitted) == before  # the input is never modified

    # Conv-heavy: int8 weights shrink the file to well under half.
    assert r["bytes_before"] == fitted.stat().st_size and r["bytes_after"] == out.stat().st_size
    assert r["size_ratio"] < 0.4
    assert r["calib_samples"] == 128 and r["test_samples"] == 1000 and r["preprocessed"]
    assert r["accuracy_before"] > 0.25  # the fitted head is a real classifier
    assert abs(r["accuracy_after"] - r["accuracy_before"]) <= 0.03
    assert r["agreement"] >= 0.8

    # The same agreement, measured here independently of hwtool's evaluation.
    x = cifar["test"].as_float(1000)
    p0, p1 = _logits(fitted, x).argmax(1), _logits(out, x).argmax(1)
    assert (p0 == p1).mean() == pytest.approx(r["agreement"])
    assert (p1 == cifar["test"].labels[:1000]).mean() == pytest.approx(r["accuracy_after"])

    q = onnx.load(out)
    onnx.checker.check_model(q)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # Per-channel: every conv weight is an int8 initializer with one scale per output channel.
    inits = {t.name: t for t in q.graph.initializer}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    for conv in (n for n in q.graph.node if n.op_type == "Conv"):
        wdq = dq[conv.input[1]]
        w, scale = inits[wdq.input[0]], numpy_helper.to_array(inits[wdq.input[1]])
        assert w.data_type == onnx.TensorProto.INT8 and scale.shape == (w.dims[0],)
    assert "hwtool.quantize" in {p.key for p in q.metadata_props}
    # ORT's CPU provider fuses the QDQ convs into integer kernels (uint8 activations make this
    # happen on x86 too); otherwise int8 would only save disk, not time.
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "QLinearConv" in fused and "Conv" not in fused

    res = CliRunner().invoke(main, args)  # the human-readable report
    assert res.exit_code == 0 and "agree" in res.stdout and "0." in res.stdout


@pytest.mark.parametrize("ops,mix_quantized", [(None, False), ("Conv", False), ("all", True)])
def test_the_gate_and_its_mix_stay_float_unless_all_ops_are_asked_for(tmp_path, ops, mix_quantized):
    """By default (and with --ops Conv) only the convolutions are quantized: the gate T (Sigmoid) and
    the products H·T and (1−T)·carry (Mul) stay float, only the sum that feeds the next conv is
    quantized as that conv's input; --ops all quantizes the gate and the products too."""
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(16, 32))), model)
    calib = tmp_path / "calib.npy"
    np.save(calib, images(8))
    out = tmp_path / "q.onnx"
    args = ["quantize", str(model), "-o", str(out), "--calib", str(calib), *(["--ops", ops] if ops else [])]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    q = onnx.load(out)
    made_by = {o: n.op_type for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert convs and all(made_by.get(n.input[0]) == "DequantizeLinear" for n in convs)
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    mix = [n for n in q.graph.node if n.op_type in ("Sigmoid", "Mul")]
    assert {n.op_type for n in mix} == {"Sigmoid", "Mul"}
    assert any(o in quantized for n in mix for o in n.output) == mix_quantized
    settings = json.loads({p.key: p.value for p in q.metadata_props}["hwtool.quantize"])
    assert settings["ops"] == (None if ops == "all" else ["Conv"])


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calib_file_and_fixed_batch_model(tmp_path, method):
    """Every calibration method; --json stays one JSON line (ORT's histogram calibrators print)."""
    model = tmp_path / "fixed4.onnx"
    onnx.save(build(Spec(widths=(16, 32), batch=4)), model)
    calib = tmp_path / "calib.npy"
    np.save(calib, images(10))  # 10 images: two full batches of 4 are used, the rest skipped
    out = tmp_path / "q.onnx"
    args = ["quantize", str(model), "-o", str(out), "--calib", str(calib), "--method", method, "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["calib_samples"] == 8 and report["config"]["method"] == method
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["hwtool.quantize"])
    assert meta["calib_images"] == 8 and meta["batch"] == 4 == report["config"]["batch"]  # what ran
    # called directly, on a ragged count, the int8 model records the whole batches it calibrated on
    from hwtool.quantize import QuantizeConfig, quantize_model

    qmodel, _ = quantize_model(onnx.load(str(model)), images(10), QuantizeConfig(method=method))
    meta = json.loads({p.key: p.value for p in qmodel.metadata_props}["hwtool.quantize"])
    assert (meta["calib_images"], meta["batch"]) == (8, 4)
    x = images(4, seed=7)
    a, b = _logits(model, x), _logits(out, x)
    assert b.shape == (4, 10)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_pruned_model_quantizes(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(16, 16, 24), removable={0: [1, 4, 6], 2: [2, 3, 5]})), model)
    calib = tmp_path / "calib.npy"
    np.save(calib, images(32))
    pruned = tmp_path / "m.pruned.onnx"
    res = CliRunner().invoke(main, ["prune", str(model), "--calib", str(calib), "-o", str(pruned)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "m.pruned.int8.onnx"
    res = CliRunner().invoke(main, ["quantize", str(pruned), "-o", str(out), "--calib", str(calib)])
    assert res.exit_code == 0, res.output
    x = images(16, seed=3)
    a, b = _logits(pruned, x), _logits(out, x)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    # The int8 file holds the same weights (int8 behind DequantizeLinear, int32 biases, the float
    # ones left as they were); its scales and zero points are not weights (they were counted, the
    # int32 biases were not, and the pruned + int8 row read more parameters than the pruned one).
    float_model, int8_model = onnx.load(pruned), onnx.load(out)
    assert any(t.data_type == onnx.TensorProto.INT32 for t in int8_model.graph.initializer)
    assert count_parameters(int8_model) == count_parameters(float_model)
    assert count_flops(int8_model) == count_flops(float_model)


def test_bad_calibration_gives_one_line_error_naming_the_shape(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(8,))), model)
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 16, 16), np.float32))
    np.save(tmp_path / "f64.npy", np.zeros((4, 3, 32, 32), np.float64))
    np.save(tmp_path / "nan.npy", np.full((4, 3, 32, 32), np.nan, np.float32))
    (tmp_path / "junk.npy").write_bytes(b"no numpy here")
    out = tmp_path / "q.onnx"
    for name in ("shape.npy", "f64.npy", "missing.npy", "junk.npy"):
        res = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(tmp_path / name)])
        assert "3x32x32" in one_line_error(res), name
        assert not out.exists()
    res = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(tmp_path / "nan.npy")])
    assert "NaN" in one_line_error(res) and not out.exists()
    res = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out)])
    assert "--calib" in one_line_error(res) and not out.exists()


def test_refuses_to_overwrite_input_or_requantize(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec(widths=(8,))), model)
    calib = tmp_path / "c.npy"
    np.save(calib, images(8))
    before = _sha(model)
    res = CliRunner().invoke(main, ["quantize", str(model), "-o", str(model), "--calib", str(calib)])
    assert "is the input" in one_line_error(res) and _sha(model) == before
    q = tmp_path / "q.onnx"
    assert CliRunner().invoke(main, ["quantize", str(model), "-o", str(q), "--calib", str(calib)]).exit_code == 0
    res = CliRunner().invoke(main, ["quantize", str(q), "-o", str(tmp_path / "qq.onnx"), "--calib", str(calib)])
    assert "already" in one_line_error(res) and not (tmp_path / "qq.onnx").exists()
    for keep_io in (False, True):  # ORT's quantizer calibrates float32 models only
        half = tmp_path / "half.onnx"
        onnx.save(to_float16(build(Spec(widths=(8,))), keep_io=keep_io), half)
        res = CliRunner().invoke(main, ["quantize", str(half), "-o", str(tmp_path / "h8.onnx"), "--calib", str(calib)])
        assert "float16 model" in one_line_error(res) and not (tmp_path / "h8.onnx").exists()


def test_a_quantize_config_refuses_unknown_settings_where_it_is_made():
    """QuantizeConfig(activations="UINT8") quantized with int8 activations through quantize_model,
    which skipped the check quantize() made."""
    from hwtool.quantize import QuantizeConfig

    with pytest.raises(ValueError, match="activations must be uint8 or int8, not 'UINT8'"):
        QuantizeConfig(activations="UINT8")
    with pytest.raises(ValueError, match="unknown calibration method 'max'"):
        QuantizeConfig(method="max")
    # one op type given alone was read letter by letter ("no C, o, n, v node"); a batch under 1
    # failed deep in the calibration with a bare StopIteration
    assert QuantizeConfig(ops="Conv").ops == ("Conv",) and QuantizeConfig(ops=["Conv", "Gemm"]).ops == ("Conv", "Gemm")
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="QuantizeConfig.batch must be a whole number of at least 1"):
            QuantizeConfig(batch=bad)


def test_quantize_model_checks_its_calibration_as_prune_does():
    """A uint8 array of 0-255 images was cast and calibrated on; prune refuses it."""
    from hwtool.quantize import quantize_model

    model = build(Spec(seed=1))
    with pytest.raises(ValueError, match="calib is uint8"):
        quantize_model(model, (images(8) * 255).astype(np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        quantize_model(model, images(8).tolist())


def test_onnx_runtime_says_nothing_of_its_own_while_quantizing(tmp_path, capfd):
    """The quantizer's sessions printed ONNX Runtime's log lines (coloured, timestamped, with its
    source file) before hwtool's report: here one for an initializer no node reads."""
    model = build(Spec(seed=1))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "unused_w"))
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "c.npy", images(16))
    capfd.readouterr()
    res = CliRunner().invoke(
        main,
        ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx")] + ["--calib", str(tmp_path / "c.npy")],
    )
    assert res.exit_code == 0, res.output
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "unused_w" not in err


def test_a_model_with_nan_weights_is_refused(tmp_path):
    """A NaN in the classifier's weights (after every activation the quantizer calibrates): it
    quantized and was written, its outputs all NaN, where the other commands refused it."""
    model = build(Spec(seed=1))
    (head,) = [n for n in model.graph.node if n.op_type == "Gemm"]
    w = next(t for t in model.graph.initializer if t.name == head.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0] = np.nan
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(tmp_path / "nan.onnx"))
    np.save(tmp_path / "c.npy", images(16))
    args = ["quantize", str(tmp_path / "nan.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "c.npy")]
    assert "NaN or infinite" in one_line_error(CliRunner().invoke(main, args))
    assert not (tmp_path / "q.onnx").exists()
