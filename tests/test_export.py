"""Export with both torch exporters: a checked graph, the input contract, metadata, ORT == torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_errors import one_line_error
from click.testing import CliRunner

from hwtool.cli import main
from hwtool.data import CLASSES
from hwtool.export import GATE_METADATA, gate_means_torch
from hwtool.runtime import make_session
from hwtool.train import build_model, load_checkpoint, load_start

WIDTHS = (8, 16, 32)


@pytest.fixture(params=["dynamo", "torchscript"])
def exported(request):
    """(exporter, path of the tiny checkpoint's ONNX export)."""
    return request.param, request.getfixturevalue(f"tiny_onnx_{request.param}")


def test_graph_passes_the_full_checker_and_keeps_the_input_contract(exported):
    _, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset >= 17

    (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert inp.name == "input"
    t = inp.type.tensor_type
    assert t.elem_type == onnx.TensorProto.FLOAT
    batch, *rest = t.shape.dim
    assert batch.dim_param and not batch.HasField("dim_value")  # a symbolic batch dimension
    assert [d.dim_value for d in rest] == [3, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]
    out = model.graph.output[0].type.tensor_type
    assert out.shape.dim[1].dim_value == 10


def test_metadata_records_classes_training_and_gates(exported, tiny_checkpoint, cifar):
    exporter, path = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["hwtool.class_names"]) == list(CLASSES)
    assert meta["hwtool.exporter"] == exporter
    assert json.loads(meta["hwtool.model_config"])["widths"] == list(WIDTHS)
    ckpt = load_checkpoint(tiny_checkpoint)
    training = json.loads(meta["hwtool.training"])
    assert training["epochs"] == 1 and training["limit"] == 512 and training["gate_penalty"] == 0.0
    assert training["test_accuracy_torch"] == ckpt["log"][-1]["test_acc"]

    gates = json.loads(meta[GATE_METADATA])
    assert [len(b) for b in gates["blocks"]] == list(WIDTHS)  # one list per block, one mean per channel
    assert all(0 < g < 1 for b in gates["blocks"] for g in b)
    # They are the means over the first `images` training images, recomputed here from the checkpoint.
    x = cifar["train"].as_float(gates["images"])
    expected = gate_means_torch(build_model(ckpt), x)
    for got, want in zip(gates["blocks"], expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_runtime_matches_torch_on_real_images(exported, tiny_checkpoint, cifar, batch):
    _, path = exported
    model = build_model(load_checkpoint(tiny_checkpoint))
    sess = make_session(path)
    for start in (0, 300):  # two different batches through the same session
        x = cifar["test"].as_float(start + batch)[start:]
        (got,) = sess.run(None, {"input": x})
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_both_exporters_compute_the_same_function(tiny_onnx_dynamo, tiny_onnx_torchscript, cifar):
    x = cifar["test"].as_float(64)
    a = make_session(tiny_onnx_dynamo).run(None, {"input": x})[0]
    b = make_session(tiny_onnx_torchscript).run(None, {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert not np.allclose(a[0], a[1])  # different images, different logits


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("dynamo", 18)])
def test_cli_export_writes_and_reports_as_one_json_line(tiny_checkpoint, tmp_path, exporter, opset):
    # the dynamo exporter prints progress lines; stdout must still hold only the JSON report
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(out), "--exporter", exporter, "--opset", str(opset), "--json"]
    )
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.stdout.splitlines() if ln.strip()]
    report = json.loads(line)
    assert report["path"] == str(out) and report["opset"] == opset and report["max_abs_diff"] < 1e-4
    assert report["top1_agreement"] == 1.0
    model = onnx.load(str(out))
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    onnx.checker.check_model(model, full_check=True)


def test_cli_export_of_a_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nope.pt"), "-o", str(out)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert result.output.strip().splitlines() == [f"error: checkpoint {tmp_path / 'nope.pt'} does not exist"]
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dynamo_below_opset_18_is_refused_not_mislabelled(tiny_checkpoint, tmp_path):
    # torch's dynamo exporter does not go below opset 18; a report saying 17 would be a lie
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(out), "--exporter", "dynamo", "--opset", "17"]
    )
    assert "opset 18" in one_line_error(res)
    assert not out.exists()


def test_a_checkpoint_of_nan_weights_is_not_exported(tiny_checkpoint, tmp_path):
    """NaN logits compared as no difference and full agreement: the model was written, exit 0."""
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["export", str(tmp_path / "nan.pt"), "-o", str(out)])
    assert "logits are NaN or infinite" in one_line_error(res) and not out.exists()


def test_an_exported_model_reads_back_as_the_checkpoint_it_came_from(exported, tiny_checkpoint):
    # training or fine-tuning can start from a shipped .onnx: its weights, bit for bit, and its shape
    _, path = exported
    want = load_checkpoint(tiny_checkpoint)
    got = load_start(path)
    assert got["config"]["model"] == want["config"]["model"]
    assert got["model"].keys() == want["model"].keys()
    for name, w in want["model"].items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(got["model"][name], w.float()), name
    assert got["log"][-1]["test_acc"] == want["log"][-1]["test_acc"]


def test_train_from_an_onnx_model_starts_from_its_weights(tiny_onnx_dynamo, cifar_path, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", cifar_path, "--out", str(out), "--from", str(tiny_onnx_dynamo)]
    res = CliRunner().invoke(main, [*args, "--epochs", "1", "--limit", "256", "--lr", "1e-9", "--fp32"])
    assert res.exit_code == 0, res.output
    # with a learning rate of 1e-9 the weights barely move from the ONNX model's
    start, trained = load_start(tiny_onnx_dynamo)["model"], load_checkpoint(out / "checkpoint.pt")["model"]
    assert trained["blocks.0.transform.weight"].shape == start["blocks.0.transform.weight"].shape
    torch.testing.assert_close(trained["blocks.2.gate.weight"], start["blocks.2.gate.weight"], atol=1e-6, rtol=0)


def test_train_from_a_pruned_foreign_or_missing_onnx_model_is_one_line(tiny_onnx_dynamo, cifar_path, tmp_path):
    from hwtool.prune import PruneConfig, prune

    pruned = tmp_path / "pruned.onnx"
    gates = json.loads({p.key: p.value for p in onnx.load(str(tiny_onnx_dynamo)).metadata_props}[GATE_METADATA])
    median = float(np.median([g for b in gates["blocks"] for g in b]))
    slim, _ = prune(str(tiny_onnx_dynamo), median, config=PruneConfig(threshold=median, refit=False))
    onnx.save(slim, str(pruned))
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(tiny_onnx_dynamo))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    missing = tmp_path / "missing.onnx"
    half = tmp_path / "half.onnx"  # convert --to float16 keeps the metadata: it read back float16-rounded
    res = CliRunner().invoke(main, ["convert", str(tiny_onnx_dynamo), "--to", "float16", "-o", str(half)])
    assert res.exit_code == 0, res.output
    cases = (
        (pruned, "is a pruned model (`hwtool prune` at threshold"),
        (foreign, "no hwtool.model_config"),
        (missing, "exist"),
    )
    for path, says in (*cases, (half, "holds float16 weights")):
        out = tmp_path / f"run-{path.stem}"
        res = CliRunner().invoke(main, ["train", "--data", cifar_path, "--out", str(out), "--from", str(path)])
        assert says in one_line_error(res)
        assert not out.exists()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_model_with_merged_and_dropped_weights_reads_back_exactly(cifar_path, tmp_path, exporter):
    # The dynamo exporter merges identical initializers under one name and drops zero biases; the
    # torchscript one keeps one of identical tensors and routes the others through Identity nodes: a
    # block trained out entirely (zero transform, gate bias -30) beside one whose BN statistics
    # equal another block's, as in the shipped reference. Its weights must still read back bit for bit.
    from hwtool.export import export_checkpoint
    from hwtool.model import HighwayConfig, HighwayNet, bake_masks
    from hwtool.train import TrainConfig

    torch.manual_seed(0)
    shape = HighwayConfig(widths=(8, 16), depth=2)
    model = HighwayNet(shape)
    for block in model.blocks:  # trained-looking BN statistics, different per block
        block.norm.running_mean.uniform_(-1, 1)
        block.norm.running_var.uniform_(0.5, 2)
    bake_masks(model, [torch.ones(8), torch.zeros(8), torch.ones(16), torch.zeros(16)])
    model.blocks[2].norm.load_state_dict(model.blocks[1].norm.state_dict())  # identical statistics (8 in)
    ckpt = {"model": model.state_dict(), "config": TrainConfig(model=shape).to_dict(), "log": [{}], "data": cifar_path}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    out = tmp_path / "m.onnx"
    export_checkpoint(tmp_path / "checkpoint.pt", out, exporter=exporter, gate_images=64, compare_images=16)

    names = {i.name for i in onnx.load(str(out)).graph.initializer}
    gone = {n for n in ckpt["model"] if not n.endswith("num_batches_tracked")} - names
    # what the exporter merged, dropped or routed through an Identity
    assert {"blocks.1.transform.bias", "blocks.2.norm.running_mean"} <= gone
    got = load_start(out)["model"]
    for name, w in ckpt["model"].items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(got[name], w.float()), name


def test_export_never_writes_over_the_data_its_checkpoint_records(tiny_checkpoint, cifar_path, tmp_path):
    """Without --data, export reads the data path in the checkpoint: an input like any other."""
    data = tmp_path / "data.tar.gz"
    data.write_bytes(Path(cifar_path).read_bytes())
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    torch.save({**ckpt, "data": str(data)}, tmp_path / "checkpoint.pt")
    before = data.read_bytes()
    res = CliRunner().invoke(main, ["export", str(tmp_path / "checkpoint.pt"), "-o", str(data)])
    assert "is the input" in one_line_error(res)
    assert data.read_bytes() == before


def test_a_refused_opset_prints_one_line_in_a_real_process(tiny_checkpoint, tmp_path):
    """The exporters log their own failures with tracebacks; the command's stderr is one line."""
    out = tmp_path / "m.onnx"
    cmd = [sys.executable, "-m", "hwtool", "export", str(tiny_checkpoint), "-o", str(out), "--opset", "17"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: the dynamo exporter wrote opset 18, not 17; ask for --opset 18 or use --exporter torchscript"
    ]
    assert not out.exists()
