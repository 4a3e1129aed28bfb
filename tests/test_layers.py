"""Highway layers beyond 2-D convs, in networks of the user's own exported by both torch exporters:
fully connected ones (Gemm over [N, C], MatMul + Add over [N, L, C], channels last), as in the
original highway networks and the highway layers of speech and text models, and 1-D and 3-D convs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_errors import one_line_error
from highway_onnx import run

torch = pytest.importorskip("torch")
nn = torch.nn

from hwtool.graph import count_parameters  # noqa: E402
from hwtool.patterns import find_blocks  # noqa: E402
from hwtool.prune import PruneConfig, prune  # noqa: E402

DEAD = [0, 2, 3]  # channels whose H and T are made exactly zero in each block


class Highway(nn.Module):
    """y = H·T + (1 − T)·x with H = relu(layer(x)), T = sigmoid(layer(H)) (or of x: `gate_reads_input`)."""

    def __init__(self, make, c: int, gate_reads_input: bool = False, gate_bias: bool = True):
        super().__init__()
        self.h, self.t, self.gate_reads_input = make(c, c, True), make(c, c, gate_bias), gate_reads_input

    def forward(self, x):
        h = torch.relu(self.h(x))
        t = torch.sigmoid(self.t(x if self.gate_reads_input else h))
        return h * t + (1 - t) * x

    def kill(self, channels: list[int]) -> None:
        """Make channels dead: H = relu(0) = 0 and T = sigmoid(-40) (about 4e-18)."""
        with torch.no_grad():
            for layer, bias in ((self.h, 0.0), (self.t, -40.0)):
                layer.weight[channels] = 0.0
                layer.bias[channels] = bias


def _linear(c_in: int, c_out: int, bias: bool) -> nn.Module:
    return nn.Linear(c_in, c_out, bias=bias)


def _conv(dims: int):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    return lambda c_in, c_out, bias: conv(c_in, c_out, 3, padding=1, bias=bias)


class Head(nn.Module):
    """Mean over every axis but the channel axis, then a linear classifier."""

    def __init__(self, c: int, channel_axis: int):
        super().__init__()
        self.axis, self.fc = channel_axis, nn.Linear(c, 10)

    def forward(self, x):
        x = x.movedim(self.axis, -1)
        return self.fc(x.reshape(x.shape[0], -1, x.shape[-1]).mean(1))


def _network(kind: str, c: int = 12) -> tuple[nn.Module, tuple[int, ...]]:
    """A stem, two highway blocks (the second's gate reads the block input) and a head; its input shape."""
    if kind in ("linear", "sequence"):
        stem, make, axis = nn.Linear(20, c), _linear, -1
        shape = (20,) if kind == "linear" else (7, 20)
    else:
        dims = {"conv1d": 1, "conv3d": 3}[kind]
        stem, make, axis = _conv(dims)(4, c, True), _conv(dims), 1
        shape = (4, 16) if dims == 1 else (4, 4, 6, 6)
    blocks = [Highway(make, c), Highway(make, c, gate_reads_input=True)]
    return nn.Sequential(stem, *blocks, Head(c, axis)).eval(), shape


def _export(net: nn.Module, shape: tuple[int, ...], exporter: str, path, frames: bool = False) -> onnx.ModelProto:
    """The network exported with a dynamic batch (and with `frames`, a dynamic dimension 1 named so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = (
            {"dynamo": True, "dynamic_shapes": {"input": {0: torch.export.Dim("N")}}}
            if exporter == "dynamo"
            else {"dynamo": False, "dynamic_axes": {"input": {0: "N", **({1: "frames"} if frames else {})}}}
        )
        torch.onnx.export(net, (torch.rand(2, *shape),), str(path), input_names=["input"], opset_version=18, **kw)
    return onnx.load(str(path))


def _close_half(block: Highway) -> None:
    """Half the gates mostly closed, not dead: H >= 0 is read by negative weights."""
    with torch.no_grad():
        block.t.weight[:6] = -8 * block.t.weight[:6].abs()


def _inputs(shape: tuple[int, ...], n: int = 32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["linear", "sequence", "conv1d", "conv3d"])
def test_dead_channels_of_other_highway_layers_are_removed_exactly(kind, exporter, tmp_path):
    """Both blocks are found (fully connected ones with channels last); their dead channels go, the
    logits stay, and each layer loses exactly its dead rows (and the gate reading H its columns)."""
    torch.manual_seed(0)
    net, shape = _network(kind)
    for block in net[1:3]:
        block.kill(DEAD)
    model = _export(net, shape, exporter, tmp_path / f"{kind}.onnx")
    blocks = find_blocks(model)
    assert [(b.width, b.gate_reads_transform) for b in blocks] == [(12, True), (12, False)]
    assert {b.channel_axis for b in blocks} == ({-1} if kind in ("linear", "sequence") else {1})
    x = _inputs(shape)
    pruned, report = prune(model, threshold=1e-6, calib=x)
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.kept for b in report.blocks] == [9, 9]
    carry = {n.op_type for n in pruned.graph.node if n.name == "hw0_carry"}  # auto: one-hot MatMul, not a Gather
    assert carry == ({"MatMul"} if kind in ("linear", "sequence") else {"Gather"})
    # The one-hot matrices are OneHot nodes on the kept indices (both blocks keep the same channels,
    # so onnxsim shares them): no float weights beyond the layers' own but each node's values (0, 1)
    one_hots = sum(n.op_type == "OneHot" for n in pruned.graph.node)
    assert one_hots == (2 if kind in ("linear", "sequence") else 0)
    removed = sum(b.params_before - b.params_after for b in report.blocks)
    assert count_parameters(pruned) - (count_parameters(model) - removed) <= 2 * one_hots
    if kind != "conv3d":  # the removed H is zero: the kept gates, read back, are the original ones
        assert report.blocks[0].gate_error_naive < 1e-6 and report.blocks[0].gate_error_refit < 1e-6
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    kernel = 1 if kind in ("linear", "sequence") else 3 ** (1 if kind == "conv1d" else 3)
    reads_h, reads_x = ((9 * 12 + 9 * 9) * kernel + 18, (9 * 12 + 9 * 12) * kernel + 18)
    assert [b.params_after for b in report.blocks] == [reads_h, reads_x]


@pytest.mark.parametrize("write_back", ["gather", "scatter", "conv"])
@pytest.mark.parametrize("kind", ["linear", "sequence", "conv1d"])
def test_the_gate_refit_works_on_other_layers(kind, write_back, tmp_path):
    """Random weights, live channels removed at 0.3: the refit reduces the kept gates' error and the
    logits' against the plain drop (the sequence net's gate has no bias, so pruning adds one), in
    every write-back."""
    torch.manual_seed(1)
    net, shape = _network(kind)
    if kind == "sequence":
        net[1].t = nn.Linear(12, 12, bias=False)
    _close_half(net[1])
    model = _export(net, shape, "torchscript", tmp_path / f"{kind}.onnx")
    x = _inputs(shape, 64)
    dropped, plain = prune(model, 0.3, calib=x, config=PruneConfig(refit=False, write_back=write_back))
    pruned, refit = prune(model, 0.3, calib=x, config=PruneConfig(write_back=write_back))
    block = refit.blocks[0]
    assert 0 < block.kept < block.width
    assert block.gate_error_refit < 0.8 * block.gate_error_naive
    logits = run(model, x)
    rms = [np.sqrt(np.mean((run(m, x) - logits) ** 2)) for m in (pruned, dropped)]
    assert rms[0] < rms[1]


def test_a_3d_conv_gate_is_pruned_without_refit(tmp_path):
    """A 3-D conv's gate is not refitted (the refit solves 1-D and 2-D convs), and the report says so."""
    torch.manual_seed(1)
    net, shape = _network("conv3d")
    _close_half(net[1])
    model = _export(net, shape, "torchscript", tmp_path / "conv3d.onnx")
    pruned, report = prune(model, 0.3, calib=_inputs(shape, 8))
    block = report.blocks[0]
    assert 0 < block.kept < block.width and "refit skipped" in block.note and block.gate_error_refit is None
    assert run(pruned, _inputs(shape, 8)).shape == (8, 10)


@pytest.mark.parametrize("kind", ["linear", "sequence"])
def test_a_fully_connected_highway_net_is_pruned_and_quantized_from_the_command_line(kind, tmp_path):
    """`hwtool prune --calib` then `hwtool quantize --calib`: with no convolution to quantize, the
    default quantizes the fully connected layers (their weights behind DequantizeLinear)."""
    import json

    from click.testing import CliRunner

    from hwtool.cli import main

    torch.manual_seed(0)
    net, shape = _network(kind)
    for block in net[1:3]:
        block.kill(DEAD)
    model = tmp_path / "m.onnx"
    _export(net, shape, "dynamo", model)
    np.save(tmp_path / "calib.npy", _inputs(shape, 64))
    res = CliRunner().invoke(main, ["prune", str(model), "--threshold", "0.01", "--calib", str(tmp_path / "calib.npy")])
    assert res.exit_code == 0, res.output
    pruned = tmp_path / "m.pruned.onnx"
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, ["quantize", str(pruned), "-o", str(out), "--calib", str(tmp_path / "calib.npy")])
    assert res.exit_code == 0, res.output
    q = onnx.load(out)
    made_by = {o: n.op_type for n in q.graph.node for o in n.output}
    layers = [n for n in q.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(layers) >= 5 and all(made_by.get(n.input[1]) == "DequantizeLinear" for n in layers)
    assert json.loads({p.key: p.value for p in q.metadata_props}["hwtool.quantize"])["ops"] == ["Gemm", "MatMul"]
    x = _inputs(shape, 64)
    assert (run(q, x).argmax(1) == run(onnx.load(model), x).argmax(1)).mean() > 0.9


@pytest.mark.parametrize("head", [True, False], ids=["class scores", "sequence output"])
def test_a_model_of_other_inputs_is_swept_on_its_calibration_inputs(head, tmp_path):
    """Without --data, sweep compares each threshold with the original on --calib: top-1 agreement
    for class scores, the max abs error for other outputs; in the table, CSV, JSON and plot. A
    dynamic sequence length is timed (--latency) at the calibration inputs' length."""
    import csv
    import json

    from click.testing import CliRunner

    from hwtool.cli import main

    torch.manual_seed(1)
    net, shape = _network("sequence")
    for block in net[1:3]:
        block.kill(DEAD)
    _close_half(net[1])
    if not head:
        net = net[:3]
    model = tmp_path / "m.onnx"
    _export(net, shape, "torchscript", model, frames=not head)  # a dynamic length: timed at --calib's
    np.save(tmp_path / "calib.npy", _inputs(shape, 64))
    args = ["sweep", str(model), "--calib", str(tmp_path / "calib.npy"), "--thresholds", "0.01,0.3", "--latency"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "m.sweep.csv")))
    meta = json.loads((tmp_path / "m.sweep.json").read_text())
    assert [int(r["kept_channels"]) for r in rows[:2]] == [24, 18] and int(rows[2]["kept_channels"]) < 18
    assert all(r["accuracy"] == "" for r in rows)
    assert float(rows[1]["max_abs_error"]) < 1e-4 < float(rows[2]["max_abs_error"])  # dead channels only, then live
    if head:
        assert meta["measure"] == "agreement" and "agree" in res.output
        assert [float(r["agreement"]) for r in rows[:2]] == [1.0, 1.0] and float(rows[2]["agreement"]) < 1.0
    else:
        assert meta["measure"] == "max_abs_error" and "max err" in res.output
        assert all(r["agreement"] == "" for r in rows)
        assert int(rows[0]["flops"]) == 2 * 7 * (20 * 12 + 4 * 12 * 12)  # at the calibration length, 7 frames
    assert all(float(r["p50_ms_batch1"]) > 0 and float(r["p50_ms_batch64"]) > 0 for r in rows)
    assert (tmp_path / "m.sweep.png").read_bytes().startswith(b"\x89PNG")
    res = CliRunner().invoke(main, ["sweep", str(model), "--csv", str(tmp_path / "x.csv")])
    assert "--calib FILE.npy" in one_line_error(res) and not (tmp_path / "x.csv").exists()


def test_a_text_model_of_token_ids_is_calibrated_pruned_swept_and_benchmarked(tmp_path):
    """Embedding, then fully connected highway layers over [N, L, C], from int64 token ids: the
    calibration array is integers (a float one is refused in one line), the prune is exact on
    dead channels, sweep and bench run on token ids."""
    from click.testing import CliRunner

    from hwtool.cli import main

    torch.manual_seed(0)
    net, shape = _network("sequence")
    for block in net[1:3]:
        block.kill(DEAD)
    net = nn.Sequential(nn.Embedding(50, 20), *net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = torch.randint(0, 50, (2, 7))
        torch.onnx.export(
            net,
            (tokens,),
            str(tmp_path / "m.onnx"),
            input_names=["tokens"],
            dynamo=False,
            dynamic_axes={"tokens": {0: "N", 1: "length"}},
        )
    ids = np.random.default_rng(0).integers(0, 50, (64, 7))
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "floats.npy", ids.astype(np.float32))
    model = str(tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["prune", model, "--threshold", "0.01", "--calib", str(tmp_path / "floats.npy")])
    assert "takes integers, int64 [Nxlength]" in one_line_error(res) and not (tmp_path / "m.pruned.onnx").exists()
    res = CliRunner().invoke(main, ["prune", model, "--threshold", "0.01", "--calib", str(tmp_path / "ids.npy")])
    assert res.exit_code == 0, res.output
    pruned = onnx.load(tmp_path / "m.pruned.onnx")
    np.testing.assert_allclose(run(pruned, ids), run(onnx.load(model), ids), atol=1e-4)
    assert sum(n.op_type in ("MatMul", "Gemm") for n in pruned.graph.node) >= 5
    res = CliRunner().invoke(main, ["sweep", model, "--calib", str(tmp_path / "ids.npy"), "--thresholds", "0.01"])
    assert res.exit_code == 0 and "agree" in res.output, res.output
    bench = ["bench", model, str(tmp_path / "m.pruned.onnx"), "--batch", "1", "--runs", "2", "--dims", "length=7"]
    res = CliRunner().invoke(main, bench)
    assert res.exit_code == 0, res.output


def test_gemm_weights_stored_in_by_out_are_read_and_written_that_way(tmp_path):
    """A Gemm without transB keeps its matrix in x out (as onnxsim's MatMul + Add fusion leaves it):
    the same network so stored prunes exactly on dead channels and refits on live ones."""
    torch.manual_seed(1)
    net, shape = _network("linear")
    net[1].kill(DEAD)
    _close_half(net[1])
    model = _export(net, shape, "torchscript", tmp_path / "m.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gemm":
            w = onnx.numpy_helper.to_array(inits[node.input[1]])
            inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[1]))
            next(a for a in node.attribute if a.name == "transB").i = 0
    x = _inputs(shape, 64)
    assert find_blocks(model)[0].width == 12
    pruned, report = prune(model, 1e-6, calib=x)
    assert report.blocks[0].kept == 9 and report.blocks[0].gate_error_naive < 1e-6
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    _, report = prune(model, 0.3, calib=x)
    block = report.blocks[0]
    assert block.kept < 9 and block.gate_error_refit < 0.8 * block.gate_error_naive


class MaskedText(nn.Module):
    """Token ids and an attention mask (int64, 1 = real token, as tokenizers give it): embedding,
    the sequence network's highway blocks on the masked embeddings, mean over real tokens, classes."""

    def __init__(self):
        super().__init__()
        net, _ = _network("sequence")
        self.embed, self.stem, self.blocks, self.fc = nn.Embedding(50, 20), net[0], net[1:3], net[3].fc
        for block in self.blocks:
            block.kill(DEAD)

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1).float()
        x = self.blocks(self.stem(self.embed(ids) * m))
        return self.fc((x * m).sum(1) / m.sum(1).clamp(min=1))


def _text_inputs(n: int, length: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None] < rng.integers(2, length + 1, (n, 1))).astype(np.int64)  # ragged lengths
    return {"ids": rng.integers(0, 50, (n, length)) * mask, "mask": mask}


def _export_text(net: nn.Module, path, exporter: str) -> None:
    """Export a model of token ids and a mask, both [N, length] with both dims dynamic."""
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            n, length = torch.export.Dim("N"), torch.export.Dim("length")
            shapes = {"ids": {0: n, 1: length}, "mask": {0: n, 1: length}}
            kw = {"dynamo": True, "dynamic_shapes": shapes}
        else:
            axes = {"ids": {0: "N", 1: "length"}, "mask": {0: "N", 1: "length"}}
            kw = {"dynamo": False, "dynamic_axes": axes}
        torch.onnx.export(net, (ids, mask), str(path), input_names=["ids", "mask"], opset_version=18, **kw)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_model_of_two_inputs_is_calibrated_from_an_npz_pruned_swept_quantized_and_benchmarked(exporter, tmp_path):
    """Token ids and a mask: calibration is an .npz of one array per input (a lone .npy, a missing
    input, unequal sample counts or float ids are one-line errors that write nothing); gates, prune
    (exact on dead channels), sweep, quantize and bench all run on both inputs."""
    from click.testing import CliRunner

    from hwtool.cli import main

    torch.manual_seed(0)
    net = MaskedText().eval()
    model = tmp_path / "m.onnx"
    _export_text(net, model, exporter)
    x = _text_inputs(64)
    np.savez(tmp_path / "calib.npz", **x)
    np.save(tmp_path / "ids.npy", x["ids"])
    np.savez(tmp_path / "no_mask.npz", ids=x["ids"])
    np.savez(tmp_path / "short_mask.npz", ids=x["ids"], mask=x["mask"][:10])
    np.savez(tmp_path / "float_ids.npz", ids=x["ids"].astype(np.float32), mask=x["mask"])

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    bad = {
        "ids.npy": "is one array but the model has 2 inputs; save ids int64 [Nxlength], mask int64",
        "no_mask.npz": "lacks input 'mask'",
        "short_mask.npz": "different numbers of samples (ids 64, mask 10)",
        "float_ids.npz": "input 'ids' takes integers, int64",
    }
    for name, needle in bad.items():
        assert needle in one_line_error(cli("prune", model, "--threshold", "0.01", "--calib", tmp_path / name)), name
    assert not (tmp_path / "m.pruned.onnx").exists()
    res = cli("prune", model, "--threshold", "0.01", "--data", "whatever")
    assert "pass --calib FILE.npz with one array per input" in one_line_error(res)

    res = cli("gates", model, "--calib", tmp_path / "calib.npz")
    assert res.exit_code == 0 and "calibration (64 samples)" in res.output, res.output
    assert res.output.count("25%") == 15  # both blocks and all: their 3 dead channels of 12 at every threshold
    res = cli("prune", model, "--threshold", "0.01", "--calib", tmp_path / "calib.npz")
    assert res.exit_code == 0, res.output
    pruned = onnx.load(tmp_path / "m.pruned.onnx")
    assert [i.name for i in pruned.graph.input] == ["ids", "mask"]
    onnx.checker.check_model(pruned, full_check=True)
    fresh = _text_inputs(16, length=9, seed=5)  # other samples and another length than calibration's
    np.testing.assert_allclose(run(pruned, fresh), run(onnx.load(model), fresh), atol=1e-4)
    with torch.no_grad():
        want = net(torch.from_numpy(fresh["ids"]), torch.from_numpy(fresh["mask"])).numpy()
    np.testing.assert_allclose(run(pruned, fresh), want, atol=1e-4)
    assert count_parameters(pruned) < count_parameters(onnx.load(model))

    res = cli("sweep", model, "--calib", tmp_path / "calib.npz", "--thresholds", "0.01,0.5", "--latency")
    assert res.exit_code == 0 and "agree" in res.output, res.output
    res = cli("quantize", tmp_path / "m.pruned.onnx", "-o", tmp_path / "q.onnx", "--calib", tmp_path / "calib.npz")
    assert res.exit_code == 0, res.output
    q = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    assert (run(q, fresh).argmax(1) == want.argmax(1)).mean() > 0.8
    res = cli("bench", model, tmp_path / "m.pruned.onnx", "--batch", "1", "--runs", "2", "--dims", "length=7")
    assert res.exit_code == 0, res.output


def test_a_labelled_test_set_of_the_models_own_inputs_gives_accuracy(tmp_path):
    """eval, sweep and quantize on an .npz of the inputs and 'labels': the accuracy is the one
    computed from torch's own predictions (ten labels made wrong on purpose), and a test set that
    cannot belong to the model is a one-line error that writes nothing."""
    from click.testing import CliRunner

    from hwtool.cli import main

    torch.manual_seed(4)
    net = MaskedText().eval()
    model = tmp_path / "m.onnx"
    _export_text(net, model, "torchscript")
    x = _text_inputs(200, seed=9)
    with torch.no_grad():
        scores = net(torch.from_numpy(x["ids"]), torch.from_numpy(x["mask"])).numpy()
    classes = scores.shape[1]
    labels = scores.argmax(1)
    labels[:10] = (labels[:10] + 1) % classes  # ten wrong: 95% exactly
    np.savez(tmp_path / "test.npz", **x, labels=labels)
    np.savez(tmp_path / "calib.npz", **_text_inputs(64, seed=1))

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    res = cli("eval", model, "--data", tmp_path / "test.npz", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["correct"] == 190 and got["samples"] == 200 and got["accuracy"] == 0.95
    res = cli("eval", model, "--data", tmp_path / "test.npz", "--limit", "20", "--batch", "7", "--json")
    assert json.loads(res.stdout)["correct"] == 10  # the first ten are the wrong ones

    args = ["--calib", tmp_path / "calib.npz", "--thresholds", "0.01", "--json", tmp_path / "s.json"]
    res = cli("sweep", model, "--data", tmp_path / "test.npz", *args)
    assert res.exit_code == 0, res.output
    swept = json.loads((tmp_path / "s.json").read_text())
    assert swept["test_samples"] == 200 and swept["measure"] == "accuracy"
    assert [r["accuracy"] for r in swept["rows"]] == [0.95, 0.95]  # dead channels go exactly
    assert swept["rows"][1]["kept_channels"] < swept["rows"][0]["kept_channels"]
    calib = ["--calib", tmp_path / "calib.npz"]
    res = cli("quantize", model, "-o", tmp_path / "q.onnx", *calib, "--data", tmp_path / "test.npz", "--json")
    assert res.exit_code == 0, res.output
    q = json.loads(res.stdout)
    assert q["accuracy_before"] == 0.95 and q["test_samples"] == 200 and q["accuracy_after"] > 0.8

    bad = {
        "no_labels.npz": (dict(x), "holds no 'labels' array; save np.savez(FILE, ids=..., mask=..., labels=...)"),
        "float_labels.npz": ({**x, "labels": labels.astype(np.float32)}, "save one integer class id per sample"),
        "short_labels.npz": ({**x, "labels": labels[:50]}, "holds 200 samples but 50 labels"),
        "other_classes.npz": ({**x, "labels": labels + classes}, f"the model scores {classes} classes"),
        "negative.npz": ({**x, "labels": labels - classes}, "negative class ids"),
        "no_mask.npz": ({"ids": x["ids"], "labels": labels}, "test set"),
    }
    for name, (arrays, needle) in bad.items():
        np.savez(tmp_path / name, **arrays)
        assert needle in one_line_error(cli("eval", model, "--data", tmp_path / name)), name
    res = cli("sweep", model, "--data", tmp_path / "test.npz", "--json", tmp_path / "t.json")
    assert "is a test set, which gives accuracy only; pass --calib" in one_line_error(res)
    res = cli("quantize", model, "-o", tmp_path / "q2.onnx", "--data", tmp_path / "test.npz")
    assert "is a test set, which gives accuracy only; pass --calib" in one_line_error(res)
    res = cli("prune", model, "--data", tmp_path / "test.npz")
    assert "pass calibration inputs of your own with --calib" in one_line_error(res)
    res = cli("eval", model, "--data", tmp_path)  # a CIFAR-10 folder it is not, and the model takes no images
    assert "CIFAR-10 gives images only; pass --data FILE.npz" in one_line_error(res)
    assert not any((tmp_path / n).exists() for n in ("t.json", "q2.onnx", "m.pruned.onnx"))


def test_the_python_api_takes_inputs_by_name_and_refits_on_them(tmp_path):
    """`hwtool.prune(model, t, calib=hwtool.Inputs({...}))` on the two-input model: exact on dead
    channels; on live ones the refit lowers the gate error computed from both inputs."""
    import hwtool

    torch.manual_seed(2)
    net = MaskedText()
    _close_half(net.blocks[0])
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = (torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.int64))
        axes = {"ids": {0: "N", 1: "length"}, "mask": {0: "N", 1: "length"}}
        torch.onnx.export(
            net, args, str(tmp_path / "m.onnx"), input_names=["ids", "mask"], dynamo=False, dynamic_axes=axes
        )
    model = onnx.load(tmp_path / "m.onnx")
    x = _text_inputs(128)
    pruned, report = hwtool.prune(model, 1e-6, calib=hwtool.Inputs(x))
    assert [b.kept for b in report.blocks] == [9, 9] and report.top1_agreement == 1.0
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    _, report = hwtool.prune(model, 0.3, calib=x)  # a plain dict of arrays by input name does too
    block = report.blocks[0]
    assert block.kept < 9 and block.gate_error_refit < 0.8 * block.gate_error_naive
    with pytest.raises(ValueError, match="same number of samples"):
        hwtool.Inputs({"ids": x["ids"], "mask": x["mask"][:3]})


class TwoHeads(nn.Module):
    """Predicted class ids (int64 [N]) first, then the features before the classifier, scaled up
    so that their error dominates: a model whose first output is not the only one that matters."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.body, self.fc = net[:3], net[3].fc

    def forward(self, x):
        features = self.body(x)
        return self.fc(features).argmax(1), 100 * features


def test_verification_covers_every_output_and_class_id_outputs(tmp_path):
    """The report's max abs error is the largest over all float outputs (here the second), and the
    top-1 agreement is read from a first output of class ids."""
    torch.manual_seed(3)
    net, shape = _network("linear")
    _close_half(net[1])
    model = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TwoHeads(net).eval(),
            (torch.rand(2, *shape),),
            str(model),
            input_names=["input"],
            dynamo=False,
            dynamic_axes={"input": {0: "N"}},
        )
    model = onnx.load(model)
    x = _inputs(shape, 64)
    pruned, report = prune(model, 0.3, calib=x)
    assert report.blocks[0].kept < 12
    sess = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, pruned)]
    (ids0, f0), (ids1, f1) = (s.run(None, {"input": x}) for s in sess)
    assert ids0.dtype == np.int64 and ids0.shape == (64,)
    err = float(np.abs(f1.astype(np.float64) - f0).max())
    assert err > 0 and report.max_abs_error == pytest.approx(err, rel=1e-6)
    assert report.top1_agreement == pytest.approx(float((ids0 == ids1).mean()))


class _Rows(nn.Module):
    """Fully connected highway layers over rows flattened from [N, T, C] (x.reshape(-1, C)), as a
    per-frame speech model often is, then back to [N, T, classes]."""

    def __init__(self, c: int = 12):
        super().__init__()
        self.stem, self.fc = nn.Linear(20, c), nn.Linear(c, 3)
        self.blocks = nn.Sequential(Highway(_linear, c), Highway(_linear, c))

    def forward(self, input):  # the name _export's dynamic batch is given under
        n, t, d = input.shape
        return self.fc(self.blocks(self.stem(input.reshape(-1, d)))).reshape(n, t, 3)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_layers_over_flattened_rows_are_measured_and_refitted_per_row(exporter, tmp_path):
    """A gate's rows are N·T here, not N: its mean is over the rows (a sigmoid's mean stays in
    [0, 1]), and the refit's batches take the same samples' rows of every activation."""
    from hwtool.gates import measure_gates

    torch.manual_seed(0)
    net = _Rows().eval()
    for block in net.blocks:
        block.kill(DEAD)
        _close_half(block)
    model = _export(net, (7, 20), exporter, tmp_path / "rows.onnx")
    x = _inputs((7, 20), n=40)
    blocks = find_blocks(model)
    stats, _ = measure_gates(model, blocks, x, batch=16)
    with torch.no_grad():
        h = torch.relu(net.blocks[0].h(net.stem(torch.from_numpy(x).reshape(-1, 20))))
        want = torch.sigmoid(net.blocks[0].t(h)).mean(0).double().numpy()
    np.testing.assert_allclose(stats.means[0], want, atol=1e-5)
    pruned, report = prune(model, 0.3, calib=x, config=PruneConfig(batch=16))  # live channels go too: refitted
    assert all(b.kept < 12 for b in report.blocks) and report.max_abs_error < 1.0
    # The refit in batches of 16 samples (112 rows) is the refit of all 40 at once: its batches take
    # whole samples' rows of every activation, so nothing is paired with another sample's rows.
    whole, whole_report = prune(model, 0.3, calib=x, config=PruneConfig(batch=len(x)))
    np.testing.assert_allclose(run(pruned, x), run(whole, x), atol=1e-5)
    refitted = [b for b in report.blocks if b.gate_error_refit is not None and 0 < b.kept < b.width]
    assert refitted and all(b.gate_error_refit < b.gate_error_naive for b in refitted)
    assert report.max_abs_error == pytest.approx(whole_report.max_abs_error, rel=1e-3, abs=1e-6)
    exact, _ = prune(model, 1e-6, calib=x, config=PruneConfig(batch=16))
    np.testing.assert_allclose(run(exact, x), run(model, x), atol=1e-5)


def test_a_pruned_sequence_model_keeps_its_matmuls_and_prunes_again(tmp_path):
    """onnxsim rewrote each MatMul + Add over [N, L, C] as Reshape, Gemm, Reshape, which hwtool
    does not take for a layer: its own pruned output had no highway block left to prune again."""
    torch.manual_seed(0)
    net, shape = _network("sequence")
    for block in net[1:3]:
        block.kill(DEAD)
    model = _export(net, shape, "torchscript", tmp_path / "m.onnx", frames=True)
    x = np.random.default_rng(0).random((32, *shape), dtype=np.float32)
    once, first = prune(model, 0.01, calib=x, config=PruneConfig(write_back="gather"))
    assert [b.kept for b in first.blocks] == [9, 9]
    assert sum(n.op_type == "MatMul" for n in once.graph.node) == 5  # the stem's and each block's two
    twice, second = prune(once, 1.0, calib=x, config=PruneConfig(write_back="gather", refit=False))
    assert [b.kept for b in second.blocks] == [0, 0]  # found again, and every channel goes at 1
    assert second.params_after < first.params_after


def test_a_sequence_model_simplified_before_pruning_is_refused_with_the_fix(tmp_path):
    """onnxsim writes MatMul + Add over [N, L, C] as Reshape, Gemm, Reshape, which hwtool does
    not take for a layer: the error says so and what to do, not just "is this a highway network?"."""
    import onnxsim

    from hwtool.patterns import NoHighwayBlockError

    torch.manual_seed(0)
    net, shape = _network("sequence")
    simplified, ok = onnxsim.simplify(_export(net, shape, "torchscript", tmp_path / "m.onnx", frames=True))
    assert ok and any(n.op_type == "Gemm" for n in simplified.graph.node)
    with pytest.raises(NoHighwayBlockError, match="Reshape, Gemm, Reshape.*before simplifying it"):
        find_blocks(simplified)
