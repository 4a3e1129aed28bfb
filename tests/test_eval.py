"""hwtool eval: the same accuracy as torch, models hwtool did not make, models it cannot use."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest
import torch
from click.testing import CliRunner
from highway_onnx import to_float16

from hwtool.cli import main
from hwtool.evaluate import accuracy_onnx, evaluate
from hwtool.runtime import load_model
from hwtool.train import build_model, load_checkpoint

LIMIT = 500


def _eval_json(model, data: str, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["eval", str(model), "--data", data, "--json", *extra])
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.stdout.splitlines() if ln.strip()]
    return json.loads(line)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_eval_accuracy_equals_torch(exporter, request, tiny_checkpoint, cifar, cifar_path):
    path = request.getfixturevalue(f"tiny_onnx_{exporter}")
    test = cifar["test"].head(LIMIT)
    with torch.no_grad():
        torch_preds = build_model(load_checkpoint(tiny_checkpoint))(torch.from_numpy(test.as_float())).argmax(1)
    torch_correct = int((torch_preds.numpy() == test.labels).sum())

    res = _eval_json(path, cifar_path, "--limit", str(LIMIT), "--batch", "64")
    assert res["samples"] == LIMIT and res["correct"] == torch_correct
    assert res["accuracy"] == torch_correct / LIMIT and res["model"] == str(path)
    # Image by image, not only in total.
    correct, preds = accuracy_onnx(load_model(path), test, batch=37)
    assert correct == torch_correct
    np.testing.assert_array_equal(preds, torch_preds.numpy())


def test_eval_text_output(tiny_onnx_dynamo, cifar_path):
    result = CliRunner().invoke(main, ["eval", str(tiny_onnx_dynamo), "--data", cifar_path, "--limit", "100"])
    assert result.exit_code == 0, result.output
    assert f"{tiny_onnx_dynamo}: top-1 " in result.stdout and "/100)" in result.stdout


# ---------------------------------------------------------------------------------------------
# a model hwtool did not make: nearest class-mean colour, built from ONNX text


def _colour_classifier(cifar, batch: str = "N") -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv(1x1 identity) -> GlobalAveragePool -> Flatten -> Gemm scoring -|m - mu_c|^2 (+ |m|^2).

    Returns the model and the class-mean colours mu (10, 3) it was built from.
    """
    train = cifar["train"].head(5000)
    colours = train.images.mean(axis=(1, 2)) / 255.0  # (N, 3)
    mu = np.stack([colours[train.labels == c].mean(0) for c in range(10)]).astype(np.float32)
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        colours (float[{batch}, 3, 32, 32] images) => (float[{batch}, 10] scores) {{
            mixed = Conv <kernel_shape = [1, 1]> (images, w)
            pooled = GlobalAveragePool (mixed)
            flat = Flatten (pooled)
            scores = Gemm <transB = 1> (flat, centres, bias)
        }}
    """)
    inits = {
        "w": np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1),
        "centres": 2 * mu,
        "bias": -(mu**2).sum(1),
    }
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(model, full_check=True)
    return model, mu


def _nearest_colour_correct(images: np.ndarray, labels: np.ndarray, mu: np.ndarray) -> int:
    m = images.mean(axis=(1, 2)) / 255.0
    preds = ((m[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
    return int((preds == labels).sum())


def test_eval_of_a_foreign_model(cifar, cifar_path, tmp_path):
    model, mu = _colour_classifier(cifar)
    path = tmp_path / "colours.onnx"
    onnx.save(model, str(path))
    test = cifar["test"].head(LIMIT)
    expected = _nearest_colour_correct(test.images, test.labels, mu)
    assert expected > 0.15 * LIMIT  # colour alone beats chance: the labels must line up to see it

    res = _eval_json(path, cifar_path, "--limit", str(LIMIT))
    assert res["correct"] == expected and res["samples"] == LIMIT
    # The same images as a test set of one's own: an .npz of the input (any name) and 'labels'.
    np.savez(tmp_path / "test.npz", pixels=test.as_float(), labels=test.labels.astype(np.int32))
    res = _eval_json(path, str(tmp_path / "test.npz"))
    assert res["correct"] == expected and res["samples"] == LIMIT and res["data"] == str(tmp_path / "test.npz")


def test_evaluate_takes_a_model_already_loaded(cifar, cifar_path, tmp_path):
    """The Python API took paths only, so prune()'s in-memory result had to be saved to be scored."""
    model, mu = _colour_classifier(cifar)
    test = cifar["test"].head(LIMIT)
    res = evaluate(model, cifar_path, limit=LIMIT)
    assert res.correct == _nearest_colour_correct(test.images, test.labels, mu) and res.samples == LIMIT
    assert "in-memory" in res.model
    with pytest.raises(TypeError, match="onnx.ModelProto or a path"):
        evaluate(model.SerializeToString(), cifar_path, limit=LIMIT)


def test_eval_of_a_float16_model(cifar, cifar_path, tmp_path):
    model, mu = _colour_classifier(cifar)
    path = tmp_path / "colours16.onnx"
    onnx.save(to_float16(model), str(path))
    test = cifar["test"].head(LIMIT)
    expected = _nearest_colour_correct(test.images, test.labels, mu)
    res = _eval_json(path, cifar_path, "--limit", str(LIMIT))
    # The images are cast to float16 on the way in; the scores round there, so a few near ties may flip.
    assert res["samples"] == LIMIT and abs(res["correct"] - expected) <= LIMIT // 50


def test_eval_of_a_fixed_batch_model_drops_the_ragged_tail(cifar, cifar_path, tmp_path):
    model, mu = _colour_classifier(cifar, batch="8")
    path = tmp_path / "fixed8.onnx"
    onnx.save(model, str(path))
    res = evaluate(path, cifar_path, limit=100, batch=64)  # --batch is overridden by the model's 8
    test = cifar["test"].head(96)
    assert res.samples == 96
    assert res.correct == _nearest_colour_correct(test.images, test.labels, mu)
    # Fewer images than one batch: a one-line error, not a division by zero.
    result = CliRunner().invoke(main, ["eval", str(path), "--data", cifar_path, "--limit", "5"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: the model takes a fixed batch of 8 samples and the test set")
    assert "gives only 5; pass at least 8 (raise --limit if it was given, or use a larger test set)" in line
    # A test set of its own smaller than one batch: no --limit to raise, and the message does not say so alone.
    np.savez(tmp_path / "three.npz", input=test.as_float()[:3], labels=test.labels[:3].astype(np.int64))
    result = CliRunner().invoke(main, ["eval", str(path), "--data", str(tmp_path / "three.npz")])
    assert "three.npz gives only 3; pass at least 8" in result.output


WRONG_INPUTS = {
    "grey 28x28": ("float", "N, 1, 28, 28"),
    "colour 64x64": ("float", "N, 3, 64, 64"),
    "channels last, 64x64": ("float", "N, 64, 64, 3"),
    "uint8 pixels": ("uint8", "N, 3, 32, 32"),
}


@pytest.mark.parametrize("elem,dims", WRONG_INPUTS.values(), ids=WRONG_INPUTS.keys())
def test_eval_refuses_a_model_with_the_wrong_input(elem, dims, cifar_path, tmp_path):
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        wrong ({elem}[{dims}] x) => (float[{dims}] y) {{
            y = Cast <to = 1> (x)
        }}
    """)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "wrong.onnx"
    onnx.save(model, str(path))
    # A real process: what a user sees on the terminal, and the exit status.
    proc = subprocess.run(
        [sys.executable, "-m", "hwtool", "eval", str(path), "--data", cifar_path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input 'x' is"), proc.stderr
    assert "float32 [N,3,32,32]" in lines[0] and "Traceback" not in proc.stderr


def test_a_model_of_free_height_and_width_takes_cifar_images(cifar_path, tmp_path):
    """A model exported with dynamic height and width runs on 32 x 32 images, but --data refused it
    ("input is float [Nx3xheightxwidth]"); one fixed at another size is still refused."""
    from highway_onnx import Spec, build

    model = build(Spec())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.save(model, str(tmp_path / "free.onnx"))
    res = _eval_json(tmp_path / "free.onnx", cifar_path, "--limit", "64")
    assert res["samples"] == 64
    dims[2].dim_value, dims[3].dim_value = 64, 64
    onnx.save(model, str(tmp_path / "big.onnx"))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "big.onnx"), "--data", cifar_path])
    assert result.exit_code == 2 and "CIFAR-10 gives float32 [N,3,32,32]" in result.output
