"""Surgery on hand-built and exported highway models: exactness, counts, write-backs, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_errors import one_line_error
from click.testing import CliRunner
from highway_onnx import REMOVABLE_DEFAULT, SPELLINGS, Spec, build, images, run, to_float16
from rendering import render

from hwtool.cli import main
from hwtool.graph import count_parameters
from hwtool.patterns import NoHighwayBlockError, find_blocks
from hwtool.prune import PruneConfig, prune

REMOVABLE = REMOVABLE_DEFAULT


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("write_back", ["gather", "scatter", "conv"])
def test_exactly_removable_channels_match(spelling, write_back):
    model = build(Spec(spelling=spelling, removable=REMOVABLE))
    x = images(24)
    pruned, report = prune(model, threshold=1e-6, calib=x, config=PruneConfig(write_back=write_back))
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    assert report.max_abs_error < 1e-4
    assert report.top1_agreement == 1.0
    # A block with nothing kept is its carry alone: no Sigmoid left for it.
    assert sum(n.op_type == "Sigmoid" for n in pruned.graph.node) == 2
    # The conv write-back's one-hot weights are stored as OneHot nodes on the kept indices: the
    # file holds no more floats than the gather write-back's but for each node's two values (0, 1).
    one_hots = sum(n.op_type == "OneHot" for n in pruned.graph.node)
    assert one_hots == (2 if write_back == "conv" else 0)
    gathered, _ = prune(model, threshold=1e-6, calib=x, config=PruneConfig(write_back="gather"))
    assert count_parameters(pruned) == count_parameters(gathered) + 2 * one_hots


@pytest.mark.parametrize("write_back", ["gather", "scatter", "conv"])
@pytest.mark.parametrize("keep_io", [False, True], ids=["float16 io", "float32 io"])
def test_a_float16_model_prunes_to_a_float16_model(write_back, keep_io, capfd):
    """... and its conv write-back's one-hots are folded by ONNX Runtime at load: stored as float16
    OneHot nodes, which its CPU provider has no kernel for, they were not (a warning a node, and
    the matrices made again every run)."""
    model = to_float16(build(Spec(spelling="h*t + (1-t)*c", removable=REMOVABLE)), keep_io=keep_io)
    x = images(24)  # float32 calibration inputs are cast to the model's input type
    pruned, report = prune(model, threshold=1e-6, calib=x, config=PruneConfig(write_back=write_back))
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    f16, io = onnx.TensorProto.FLOAT16, (onnx.TensorProto.FLOAT if keep_io else onnx.TensorProto.FLOAT16)
    assert pruned.graph.input[0].type.tensor_type.elem_type == io
    assert pruned.graph.output[0].type.tensor_type.elem_type == io
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, f16}
    assert {t.data_type for t in pruned.graph.initializer} & floats == {f16}
    xin = x if keep_io else x.astype(np.float16)
    capfd.readouterr()
    # The refitted gates are rounded to float16 again: equal to float16 precision, not bit for bit.
    np.testing.assert_allclose(run(pruned, xin), run(model, xin), atol=2e-2)
    assert "constant fold" not in capfd.readouterr().err
    assert sum(n.op_type == "OneHot" for n in pruned.graph.node) == (2 if write_back == "conv" else 0)
    assert report.max_abs_error < 2e-2 and report.top1_agreement == 1.0


@pytest.mark.parametrize("spelling", ["h*t + (1-t)*c", "c + t*(h-c)"])
def test_a_gate_that_reads_the_input_loses_only_its_rows_and_is_not_refitted(spelling):
    """The original highway design, T = Sigmoid(Conv(z)): removing H channels leaves the kept gates'
    inputs whole, so the prune is exact without a refit, the gate conv keeps its input width and
    each pruned block says why it was not refitted."""
    spec = Spec(spelling=spelling, removable=REMOVABLE, gate_reads="input", bn_after=True)
    model = build(spec)
    x = images(24)
    pruned, report = prune(model, threshold=1e-6, calib=x, config=PruneConfig(simplify=False))
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    assert report.top1_agreement == 1.0
    assert [b.gate_error_refit for b in report.blocks] == [None] * 3
    assert "no refit" in report.blocks[0].note and "no refit" in report.blocks[2].note
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer}
    gate_inputs = {n.input[0] for n in pruned.graph.node if n.op_type == "Sigmoid"}
    gate_shapes = sorted(
        weights[n.input[1]].shape for n in pruned.graph.node if n.op_type == "Conv" and n.output[0] in gate_inputs
    )
    assert gate_shapes == [(5, 8, 3, 3), (7, 8, 3, 3)]  # kept rows; all 8 input channels (block 2's input is 8 wide)
    expected = 0
    c_in = 8
    for i, width in enumerate(spec.widths):
        r, k = len(REMOVABLE[i]), width - len(REMOVABLE[i])
        expected += r * (c_in * 9 + 1) + 4 * r  # transform filters, biases and BN-after channels
        expected += r * (c_in * 9 + 1)  # the gate conv's removed rows
        expected += "1-t" in spelling  # the constant 1 of the original mix, where it has one
        if k == 0:
            expected += c_in * 4  # the block's input BN goes with it
        c_in = width
    assert report.params_before - report.params_after == expected


def test_a_gate_that_reads_h_through_another_node_is_left_whole():
    """T = Sigmoid(Conv(Neg(H))) is found by its mix as a gate that does not read H directly, but it
    does read H: pruning must not narrow H under it. The block is left whole, the output unchanged."""
    model = _one_block(gate_reads="nh")
    model.graph.node.insert(2, onnx.helper.make_node("Neg", ["h"], ["nh"]))  # after Relu, before the gate conv
    (block,) = find_blocks(model)
    assert not block.gate_reads_transform
    x = np.random.default_rng(1).random((8, 4, 8, 8), dtype=np.float32)
    pruned, report = prune(model, threshold=0.01, calib=x)
    assert report.blocks[0].kept == 4 and "left whole" in report.blocks[0].note
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-6)


def _one_block(gate_reads: str = "h", carry: str = "x", extra: list | None = None, outputs=("y",), inits=()):
    """y = H·T + (1−T)·carry with H = Relu(hc), hc = Conv(x), T = Sigmoid(Conv(gate_reads)), four
    channels of which gates 1 and 3 are off; extra nodes after it, more outputs and initializers."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    wh, wt = rng.normal(0, 0.5, (2, 4, 4, 1, 1)).astype("float32")
    wh[[1, 3]] = 0  # H is zero where the gate is off: removing those channels is exact
    w = [numpy_helper.from_array(wh, "wh"), numpy_helper.from_array(wt, "wt")]
    bias = numpy_helper.from_array(np.array([0, -40, 0, -40], "float32"), "bt")
    one = numpy_helper.from_array(np.array(1.0, "float32"), "one")
    nodes = [
        helper.make_node("Conv", ["x", "wh"], ["hc"]),
        helper.make_node("Relu", ["hc"], ["h"]),
        helper.make_node("Conv", [gate_reads, "wt", "bt"], ["tc"]),
        helper.make_node("Sigmoid", ["tc"], ["t"]),
        helper.make_node("Mul", ["h", "t"], ["a"]),
        helper.make_node("Sub", ["one", "t"], ["u"]),
        helper.make_node("Mul", ["u", carry], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
        *(extra or []),
    ]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    shapes = {"y": ["N", 4, 8, 8], "s": ["N"], "r": []}
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, shapes[o]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [x], outs, [*w, bias, one, *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("gate_reads,carry", [("hc", "x"), ("h", "hc")], ids=["gate reads hc", "carry is hc"])
def test_a_block_that_reads_h_before_its_activation_is_left_whole(gate_reads, carry):
    """A gate or a carry that reads the transform layer's output before H's activation reads what
    pruning narrows (it was judged inside the block, and the pruned model did not run)."""
    model = _one_block(gate_reads, carry)
    x = np.random.default_rng(1).random((8, 4, 8, 8), dtype=np.float32)
    pruned, report = prune(model, threshold=0.01, calib=x)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.blocks[0].kept == 4 and "reads H before its last step" in report.blocks[0].note
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-6)


def _if_reading(tensor: str, axes: str) -> list:
    """An If whose two branches take ReduceMean(tensor, axes) of the main graph's tensors."""
    from onnx import helper, numpy_helper

    def branch(name: str):
        nodes = (
            []
            if axes == "axes"
            else [helper.make_node("Constant", [], [axes], value=numpy_helper.from_array(np.array([1, 2, 3])))]
        )
        nodes.append(helper.make_node("ReduceMean", [tensor, axes], [f"{name}_o"], keepdims=0))
        out = helper.make_tensor_value_info(f"{name}_o", onnx.TensorProto.FLOAT, ["N"])
        return helper.make_graph(nodes, name, [], [out])

    return [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "one"], ["cond"]),
        helper.make_node("If", ["cond"], ["s"], then_branch=branch("then"), else_branch=branch("else")),
    ]


@pytest.mark.parametrize("case", ["reads T", "reads a tensor only it reads", "reads y and an initializer"])
def test_tensors_that_an_if_branch_reads_from_the_main_graph_are_read(case):
    """A subgraph's reads from the scope around it count as reads: T read only there leaves the
    block whole, a tensor only a branch reads keeps its producer, the If sorts after what it reads,
    and an initializer only a branch reads stays (each was lost, or the If judged a non-reader)."""
    from onnx import helper, numpy_helper

    axes = numpy_helper.from_array(np.array([1, 2, 3]), "axes")
    extra, inits = {
        "reads T": (_if_reading("t", "t_axes"), []),
        "reads a tensor only it reads": (
            [helper.make_node("Abs", ["y"], ["feat"]), *_if_reading("feat", "f_axes")],
            [],
        ),
        "reads y and an initializer": (_if_reading("y", "axes"), [axes]),
    }[case]
    model = _one_block(extra=extra, outputs=("y", "s"), inits=inits)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).random((8, 4, 8, 8), dtype=np.float32)
    for simplify in (False, True):
        pruned, report = prune(model, threshold=0.01, calib=x, config=PruneConfig(simplify=simplify))
        onnx.checker.check_model(pruned, full_check=True)
        assert report.blocks[0].kept == (4 if case == "reads T" else 2)
        for got, want in zip(run_all_outputs(pruned, x), run_all_outputs(model, x), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_carry_that_broadcasts_over_space_leaves_the_block_whole(tmp_path):
    """(1−T)·GlobalAveragePool(x): the carry is [N, C, 1, 1] against H's [N, C, 8, 8], so a removed
    channel cannot carry it through; with calibration or with gate means from metadata alike (the
    pruned model did not run, or the checker failed with a traceback)."""
    from onnx import helper

    from hwtool.gates import GATE_METADATA

    pool = helper.make_node("GlobalAveragePool", ["x"], ["g"])
    model = _one_block(carry="g")
    model.graph.node.insert(0, pool)
    x = np.random.default_rng(1).random((8, 4, 8, 8), dtype=np.float32)
    pruned, report = prune(model, threshold=0.01, calib=x)
    assert report.blocks[0].kept == 4 and "broadcasts against H" in report.blocks[0].note
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-6)
    model.metadata_props.add(key=GATE_METADATA, value=json.dumps({"blocks": [[0.5, 0.0, 0.5, 0.0]], "images": 8}))
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(
        main, ["prune", str(tmp_path / "m.onnx"), "--threshold", "0.01", "--no-refit", "-o", str(tmp_path / "p.onnx")]
    )
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(run(onnx.load(tmp_path / "p.onnx"), x), run(model, x), atol=1e-6)


def test_a_pruned_model_that_fails_the_checker_is_one_line_and_not_written(tmp_path, monkeypatch):
    """Should the surgery ever make an invalid graph, the user gets one line, not a traceback."""
    import hwtool.prune as prune_module

    def broken(model):
        model.graph.node.append(onnx.helper.make_node("Relu", ["nowhere"], ["y2"]))
        return model

    monkeypatch.setattr(prune_module, "_one_hots_as_nodes", broken)
    model = build(Spec(removable=REMOVABLE))
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", images(8))
    out = tmp_path / "p.onnx"
    args = [
        "prune",
        str(tmp_path / "m.onnx"),
        "--threshold",
        "1e-6",
        "--calib",
        str(tmp_path / "x.npy"),
        "-o",
        str(out),
    ]
    line = one_line_error(CliRunner().invoke(main, args))
    assert "fails ONNX's checker" in line and "nothing was written" in line
    assert not out.exists()


def test_a_model_with_a_scalar_output_prunes_and_verifies():
    """A second output that is one number a batch (a mean over everything) is compared batch by
    batch (joining the batches' outputs failed: zero-dimensional arrays cannot be concatenated)."""
    from onnx import helper

    model = _one_block(extra=[helper.make_node("ReduceMean", ["y"], ["r"], keepdims=0)], outputs=("y", "r"))
    x = np.random.default_rng(1).random((20, 4, 8, 8), dtype=np.float32)
    pruned, report = prune(model, threshold=0.01, calib=x, config=PruneConfig(batch=8))
    assert report.blocks[0].kept == 2 and report.max_abs_error < 1e-5
    for got, want in zip(run_all_outputs(pruned, x), run_all_outputs(model, x), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_block_whose_gate_and_transform_share_a_conv_counts_it_once():
    """H = Relu(hc), T = Sigmoid(hc) from one conv: the block's parameter counts are the model's
    (the layer was counted as transform and again as gate)."""
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.5, (4, 4, 1, 1)).astype("float32")
    w[[1, 3]] = 0
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([0.1, -40, 0.2, -40], "float32"), "b"),
        numpy_helper.from_array(np.array(1.0, "float32"), "one"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["hc"]),
        helper.make_node("Relu", ["hc"], ["h"]),
        helper.make_node("Sigmoid", ["hc"], ["t"]),
        helper.make_node("Mul", ["h", "t"], ["a"]),
        helper.make_node("Sub", ["one", "t"], ["u"]),
        helper.make_node("Mul", ["u", "x"], ["c"]),
        helper.make_node("Add", ["a", "c"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 4, 8, 8]) for n in ("x", "y")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", io[:1], io[1:], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    x = np.random.default_rng(1).random((8, 4, 8, 8), dtype=np.float32)
    pruned, report = prune(model, threshold=0.01, calib=x)
    (block,) = report.blocks
    assert (block.params_before, block.params_after) == (20, 10)  # 4 or 2 filters of 4 weights and a bias
    assert report.params_before == 21 and report.params_after <= 11  # the model: the block and the 1 of 1 − T
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-6)


def run_all_outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@pytest.mark.parametrize("bn_before,bn_after", [(True, False), (False, True)])
def test_parameter_count_falls_by_exactly_what_was_removed(bn_before, bn_after):
    spec = Spec(removable=REMOVABLE, bn_before=bn_before, bn_after=bn_after)
    model = build(spec)
    x = images(16)
    pruned, report = prune(model, 1e-6, calib=x, config=PruneConfig(simplify=False))
    expected = 0
    c_in = 8
    for i, width in enumerate(spec.widths):
        r = len(REMOVABLE[i])
        k = width - r
        expected += r * (c_in * 9 + 1)  # transform filters and biases
        expected += 4 * r if bn_after else 0  # BN-after-conv channels
        expected += width * width * 9 - k * k * 9 + r  # gate conv weights and biases
        expected += 1  # the constant 1 of the original mix
        if k == 0:
            expected += c_in * 4 if bn_before else 0  # the block's input BN goes with it
        c_in = width
    assert count_parameters(model) - count_parameters(pruned) == expected
    assert report.params_before - report.params_after == expected


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_io_contract_is_kept(opset):
    model = build(Spec(opset=opset, removable=REMOVABLE, input_name="img:0", output_name="out/1", batch="batch"))
    pruned, _ = prune(model, 1e-6, calib=images(8))
    assert [i.name for i in pruned.graph.input] == ["img:0"]
    assert [o.name for o in pruned.graph.output] == ["out/1"]
    dim0 = pruned.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    assert pruned.opset_import[0].version == opset
    # dynamic batch still works
    assert run(pruned, images(3)).shape == (3, 10)


def test_fixed_batch_model():
    model = build(Spec(batch=8, removable=REMOVABLE))
    pruned, report = prune(model, 1e-6, calib=images(20))
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    assert report.calibration_images == 16  # whole batches of 8 only
    assert report.max_abs_error < 1e-4
    np.testing.assert_allclose(run(pruned, images(8)), run(model, images(8)), atol=1e-4)


def test_deterministic_bytes():
    model = build(Spec(removable=REMOVABLE))
    a, _ = prune(model, 0.3, calib=images(16))
    b, _ = prune(model, 0.3, calib=images(16))
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


@pytest.mark.parametrize("gate_activation", ["Sigmoid", "HardSigmoid"])
def test_refit_beats_the_plain_drop(gate_activation):
    """Random weights: the kept gates read the removed H, so the gate refit must reduce the gate
    error (measured through the block's own activation) and the output error. (The transform refit
    is left out here: it aims at the unpruned network's responses, which on random weights can
    leave the output a little further off; on trained networks it brings it much closer, see
    test_the_transform_refit_restores_what_pruning_upstream_moved.)"""
    model = build(Spec(seed=3, gate_activation=gate_activation))
    x = images(64)
    _, plain = prune(model, 0.3, calib=x, config=PruneConfig(refit=False))
    _, refit = prune(model, 0.3, calib=x, config=PruneConfig(refit_transforms=False))
    pruned_blocks = [b for b in refit.blocks if 0 < b.kept < b.width]
    assert pruned_blocks, "threshold 0.3 should prune part of some block"
    for b in pruned_blocks:
        assert b.gate_error_refit < b.gate_error_naive < 1.0
    assert refit.max_abs_error < plain.max_abs_error


@pytest.mark.parametrize("write_back", ["gather", "conv"])
@pytest.mark.parametrize(
    "variant",
    [
        {"gate_activation": "HardSigmoid"},
        {"activation": "SiLU", "opset": 20},
        {"activation": "Gelu", "opset": 20},
        {"activation": "GeluErf"},
        {"activation": "GeluTanh"},
    ],
    ids=["HardSigmoid gates", "SiLU transforms", "GELU transforms", "GELU spelled with Erf", "GELU spelled with Tanh"],
)
def test_other_gate_and_transform_activations_prune_exactly(variant, write_back):
    model = build(Spec(removable=REMOVABLE, **variant))
    x = images(24)
    pruned, report = prune(model, threshold=1e-6, calib=x, config=PruneConfig(write_back=write_back))
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    if variant.get("gate_activation") == "HardSigmoid":
        assert sum(n.op_type == "HardSigmoid" for n in pruned.graph.node) == 2
        assert not any(n.op_type == "Sigmoid" for n in pruned.graph.node)


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_users_torch_network_prunes_exactly(exporter, folded, tmp_path):
    """A network of the user's own (not hwtool's model): gates by torch's Hardsigmoid, transforms by
    SiLU and GELU, one gate conv followed by BatchNorm; exported by each torch exporter, with constant
    folding (the BatchNorm fused into the gate conv) or without (BatchNorm left between the gate conv
    and its sigmoid, the mix's 1 behind a Cast; found after onnxsim). Its dead channels (H and T zero)
    are removed and the logits stay the same."""
    import warnings

    import torch
    from torch import nn

    from hwtool.respell import highway_model

    class Block(nn.Module):
        def __init__(self, c: int, w: int, stride: int, act: nn.Module, gate_norm: bool):
            super().__init__()
            self.act, self.gate_norm = act, nn.BatchNorm2d(w) if gate_norm else nn.Identity()
            self.norm, self.h, self.t = nn.BatchNorm2d(c), nn.Conv2d(c, w, 3, stride, 1), nn.Conv2d(w, w, 3, 1, 1)
            self.proj = nn.Conv2d(c, w, 1, stride, bias=False) if (c, stride) != (w, 1) else None
            with torch.no_grad():  # channels 0, 2, 3 dead: H = act(0) = 0 and T = hardsigmoid(about -40) = 0
                for conv, bias in ((self.h, 0.0), (self.t, -40.0)):
                    conv.weight[[0, 2, 3]] = 0.0
                    conv.bias[[0, 2, 3]] = bias
                if gate_norm:
                    bn = self.gate_norm
                    bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
                    bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)

        def forward(self, x):
            h = self.act(self.h(self.norm(x)))
            t = nn.functional.hardsigmoid(self.gate_norm(self.t(h)))
            return h * t + (1 - t) * (x if self.proj is None else self.proj(x))

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1),
        Block(8, 8, 1, nn.SiLU(), gate_norm=False),
        Block(8, 16, 2, nn.GELU(), gate_norm=True),
        nn.AdaptiveAvgPool2d(1),
    )
    net.append(nn.Sequential(nn.Flatten(), nn.Linear(16, 10))).eval()
    path = tmp_path / f"user-{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = (
            {"dynamo": True, "dynamic_shapes": {"input": {0: torch.export.Dim("N")}}, "optimize": folded}
            if exporter == "dynamo"
            else {"dynamo": False, "dynamic_axes": {"input": {0: "N"}}, "do_constant_folding": folded}
        )
        torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(path), input_names=["input"], opset_version=20, **kw)
    model = onnx.load(str(path))
    if not folded:
        assert any(
            n.op_type == "BatchNormalization" for n in model.graph.node if "gate_norm" in n.name + "".join(n.input)
        )
        try:  # as exported, the BatchNorm hides block 2 (and from dynamo, the Cast every block)
            found = len(find_blocks(model))
        except NoHighwayBlockError:
            found = 0
        assert found < 2
    assert [b.gate_activation for b in highway_model(model)[1]] == ["HardSigmoid"] * 2
    x = images(16)
    pruned, report = prune(model, threshold=1e-6, calib=x)
    assert [(b.width, b.kept) for b in report.blocks] == [(8, 5), (16, 13)]
    assert report.params_before == count_parameters(model)  # the model as given, gate BatchNorm and all
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    assert report.max_abs_error < 1e-4


@pytest.mark.parametrize("write_back", ["gather", "conv"])
def test_a_depthwise_gate_loses_its_rows_and_needs_no_refit(write_back):
    """T = Sigmoid(depthwise Conv_T(H)): a kept gate reads only its own channel, so the removed
    channels take nothing from it; the gate conv keeps one group per kept channel."""
    model = build(Spec(gate_depthwise=True, removable=REMOVABLE))
    assert all(b.gate_depthwise for b in find_blocks(model))
    x = images(24)
    pruned, report = prune(model, threshold=1e-6, calib=x, config=PruneConfig(write_back=write_back))
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    kept_blocks = [b for b in report.blocks if b.kept]
    assert all("no refit needed" in b.note and b.gate_error_refit is None for b in kept_blocks)
    # At a threshold that removes live channels: one group per kept channel in each gate conv.
    pruned, report = prune(model, threshold=0.3, calib=x)
    assert any(0 < b.kept < b.width for b in report.blocks)
    groups = sorted(a.i for n in pruned.graph.node for a in n.attribute if a.name == "group")
    assert groups == sorted(b.kept for b in report.blocks if b.kept)
    assert run(pruned, x).shape == (24, 10)  # and ORT runs it


def test_highway_model_simplifies_only_when_that_finds_more_blocks():
    """A model whose sigmoids are all gates (or SiLUs) is searched as given; an extra sigmoid outside
    any block (a squeeze-excite, say) sends it through onnxsim, whose result is kept only if it shows
    more blocks."""
    from hwtool.respell import highway_model

    model = build(Spec(activation="SiLU", opset=20))
    same, blocks = highway_model(model)
    assert same is model and len(blocks) == 3
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    out = extra.graph.output[0].name
    extra.graph.node.append(onnx.helper.make_node("Sigmoid", [out], ["probs"]))
    extra.graph.output.append(onnx.ValueInfoProto(name="probs"))
    same, blocks = highway_model(extra)
    assert same is extra and len(blocks) == 3


def test_exported_models_prune_exactly(tiny_onnx_dynamo, tiny_onnx_torchscript, cifar_path):
    from hwtool.data import load_cifar10

    x = load_cifar10(cifar_path)["test"].as_float(64)
    for path in (tiny_onnx_dynamo, tiny_onnx_torchscript):
        model = onnx.load(str(path))
        # threshold 0 removes nothing: the model must come back equivalent
        same, rep0 = prune(model, 0.0, calib=x)
        assert rep0.params_after <= rep0.params_before
        np.testing.assert_allclose(run(same, x), run(model, x), atol=1e-4)
        # make block 1's channels 0..3 exactly removable and prune them
        blocks = find_blocks(model)
        g = {n.output[0]: n for n in model.graph.node}
        inits = {t.name: t for t in model.graph.initializer}
        b = blocks[1]
        hconv, tconv = g[b.transform_conv], g[b.gate_conv]
        for name, rows, value in (
            (hconv.input[1], [0, 1, 2, 3], 0.0),
            (hconv.input[2], [0, 1, 2, 3], 0.0),
            (tconv.input[1], [0, 1, 2, 3], 0.0),
            (tconv.input[2], [0, 1, 2, 3], -40.0),
        ):
            arr = onnx.numpy_helper.to_array(inits[name]).copy()
            arr[rows] = value
            inits[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
        meta = [p for p in model.metadata_props if p.key != "hwtool.gate_means"]
        del model.metadata_props[:]
        model.metadata_props.extend(meta)
        ref = run(model, x)
        means = [np.ones(bl.width) for bl in blocks]
        means[1][[0, 1, 2, 3]] = 0.0
        from hwtool.gates import GateStats

        pruned, rep = prune(model, 0.5, calib=x, gate_stats=GateStats(tuple(means), "test", 0))
        assert [bl.kept for bl in rep.blocks] == [8, 12, 32]
        np.testing.assert_allclose(run(pruned, x), ref, atol=1e-4)


def test_metadata_gates_without_calibration(tiny_onnx_dynamo):
    model = onnx.load(str(tiny_onnx_dynamo))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["hwtool.gate_means"])
    thr = float(np.median(np.concatenate(meta["blocks"])))
    pruned, rep = prune(model, thr, config=PruneConfig(refit=False))
    assert rep.gate_source.startswith("model metadata")
    assert rep.max_abs_error is None  # nothing to verify against
    assert rep.params_after < rep.params_before
    assert run(pruned, images(2)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# CLI


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _save(model, path):
    onnx.save(model, str(path))
    return path


def test_cli_prune_writes_default_output_and_json(tmp_path):
    src = _save(build(Spec(removable=REMOVABLE)), tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", images(16))
    before = src.read_bytes()
    res = _cli(["prune", src, "--threshold", "0.000001", "--calib", tmp_path / "calib.npy", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["output"] == str(tmp_path / "net.pruned.onnx")
    assert [b["kept"] for b in rep["blocks"]] == [5, 0, 7]
    assert rep["flops_after"] < rep["flops_before"]
    assert src.read_bytes() == before  # the input is never modified
    onnx.checker.check_model(onnx.load(rep["output"]), full_check=True)


def test_cli_prunes_a_model_with_external_data_into_one_self_contained_file(tmp_path):
    model = build(Spec(removable=REMOVABLE))
    src = tmp_path / "in" / "net.onnx"
    src.parent.mkdir()
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # saving with external data rewrites the proto it is given
    onnx.save(on_disk, str(src), save_as_external_data=True, location="net.weights", size_threshold=0)
    assert (src.parent / "net.weights").stat().st_size > 10_000
    np.save(tmp_path / "calib.npy", images(16))
    out = tmp_path / "out" / "net.pruned.onnx"
    out.parent.mkdir()
    res = _cli(["prune", src, "--threshold", "0.000001", "--calib", tmp_path / "calib.npy", "-o", out])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["net.pruned.onnx"]
    pruned = onnx.load(str(out), load_external_data=False)
    assert not [t.name for t in pruned.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    x = images(8)
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)


def test_cli_data_for_a_model_of_another_input_size_says_to_pass_calib(tmp_path, cifar_path):
    """--data gives 32x32 CIFAR images; a 64x64 model is told to bring --calib, and prunes with it."""
    model = build(Spec(removable=REMOVABLE))
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 64
    src = _save(model, tmp_path / "net64.onnx")
    line = one_line_error(_cli(["prune", src, "--data", cifar_path, "--count", "8"]))
    assert "[Nx3x64x64]" in line and "pass --calib" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net64.onnx"]
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((8, 3, 64, 64), dtype=np.float32))
    res = _cli(["prune", src, "--calib", tmp_path / "calib.npy", "--threshold", "0.000001", "--json"])
    assert res.exit_code == 0, res.output
    assert [b["kept"] for b in json.loads(res.output)["blocks"]] == [5, 0, 7]


def test_cli_max_error_writes_nothing(tmp_path):
    src = _save(build(Spec(seed=3)), tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", images(16))
    res = _cli(["prune", src, "--threshold", "0.4", "--calib", tmp_path / "calib.npy", "--max-error", "1e-9"])
    assert res.exit_code != 0
    assert res.output.startswith("error:") and "exceeds --max-error" in res.output
    assert not (tmp_path / "net.pruned.onnx").exists()


def test_max_error_is_not_met_by_a_model_without_a_float_output(tmp_path):
    """A model ending in class ids (ArgMax) has no floating-point output: its errors were shown as
    0 and --max-error 0 passed, whatever the pruning did to its answers."""
    model = build(Spec(seed=3))
    logits = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("ArgMax", [logits], ["ids"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"]))
    src = _save(model, tmp_path / "ids.onnx")
    np.save(tmp_path / "calib.npy", images(16))
    args = ["prune", src, "--threshold", "0.4", "--calib", tmp_path / "calib.npy"]
    res = _cli([*args, "--max-error", "0"])
    assert "no floating-point output" in one_line_error(res) and not (tmp_path / "ids.pruned.onnx").exists()
    res = _cli([*args, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["max_abs_error"] is None and report["max_rel_error"] is None
    assert 0 <= report["top1_agreement"] < 1  # class ids compared as they are: threshold 0.4 changes some
    res = _cli([*args, "-o", tmp_path / "again.onnx"])
    assert res.exit_code == 0, res.output
    row = res.output.split("verification")[1].splitlines()[4]  # under the title, rules and header
    assert row.split("│")[1].strip() == "-" and "%" in row


@pytest.mark.parametrize(
    "case,message",
    [
        ("not_highway", "no highway block"),
        ("truncated", "not a readable ONNX model"),
        ("text", "not a readable ONNX model"),
        ("threshold", "outside [0, 1]"),
        ("missing_calib", "does not exist"),
        ("calib_shape", "expected float32 [Nx3x32x32]"),
        ("calib_dtype", "expected float32"),
        ("no_calib_no_meta", "calibration"),
        ("same_output", "is the input"),
        ("quantized", "the model is quantized"),
    ],
)
def test_cli_bad_inputs(tmp_path, case, message):
    good = build(Spec(removable=REMOVABLE))
    src = _save(good, tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", images(4))
    args = ["prune", src, "--calib", tmp_path / "calib.npy"]
    if case == "not_highway":
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 32, 32])
        plain = onnx.helper.make_model(
            onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        )
        _save(plain, src)
    elif case == "truncated":
        src.write_bytes(good.SerializeToString()[:500])
    elif case == "text":
        src.write_text("hello")
    elif case == "threshold":
        args += ["--threshold", "1.5"]
    elif case == "missing_calib":
        args[-1] = tmp_path / "nope.npy"
    elif case == "calib_shape":
        np.save(tmp_path / "calib.npy", images(4)[:, :, :16])
    elif case == "calib_dtype":
        np.save(tmp_path / "calib.npy", images(4).astype(np.float64))
    elif case == "no_calib_no_meta":
        args = ["prune", src]
    elif case == "same_output":
        args += ["-o", src]
    elif case == "quantized":  # the shipped int8 model: prune the float one, then quantize
        src.write_bytes((Path(__file__).resolve().parents[1] / "models/reference.pruned.int8.onnx").read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _cli(args)
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert message in lines[0]
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_weights_shared_through_identity_are_followed():
    """The torchscript exporter deduplicates equal weights and aliases them with Identity nodes."""
    model = build(Spec(removable=REMOVABLE))
    g = {n.output[0]: n for n in model.graph.node}
    blocks = find_blocks(model)
    gate_conv = g[blocks[2].gate_conv]
    alias = onnx.helper.make_node("Identity", [gate_conv.input[2]], ["aliased_bias"])
    gate_conv.input[2] = "aliased_bias"
    model.graph.node.insert(0, alias)
    pruned, report = prune(model, 1e-6, calib=images(8))
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    assert report.max_abs_error < 1e-4


def test_patches_match_a_padded_reference():
    from hwtool.prune import _patches

    h = np.random.default_rng(0).random((3, 4, 6, 5), dtype=np.float32)
    rows = np.array([[0, 0, 0], [1, 5, 4], [2, 2, 3], [0, 0, 4]])
    hp = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.stack([hp[n, :, i : i + 3, j : j + 3].reshape(-1) for n, i, j in rows])
    x = _patches(h, rows, (3, 3), [1, 1, 1, 1])
    np.testing.assert_array_equal(x[:, :-1], ref)
    np.testing.assert_array_equal(x[:, -1], 1.0)  # the bias column


def _one_conv(h: np.ndarray, w: np.ndarray, **attrs) -> tuple[onnx.ModelProto, np.ndarray]:
    """A model of one Conv z = conv(h; w) with these attributes, and ORT's z."""
    conv = onnx.helper.make_node("Conv", ["h", "w"], ["z"], **attrs)
    graph = onnx.helper.make_graph(
        [conv],
        "g",
        [onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, list(h.shape))],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    return model, run(model, h)


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("kernel", [(2, 3), (4,)], ids=["2-D", "1-D"])
def test_the_refit_reads_the_gate_conv_as_ort_computes_it(kernel, auto_pad):
    """Patches taken with the gate conv's geometry (explicit pads or SAME padding of an even kernel,
    whose odd pad goes at the end or the start; a 1-D conv as height-1 images) times its weights
    give ORT's conv output."""
    from hwtool.prune import _as_2d, _gate_conv_geometry, _patches

    rng = np.random.default_rng(0)
    h = rng.random((2, 3, *(6, 5)[-len(kernel) :]), dtype=np.float32)
    w = rng.standard_normal((3, 3, *kernel)).astype(np.float32)
    pads = {"auto_pad": auto_pad} if auto_pad != "NOTSET" else {"pads": [1] * len(kernel) + [2] * len(kernel)}
    model, z = _one_conv(h, w, **pads)
    from hwtool.graph import Graph
    from hwtool.patterns import affine

    layer = affine(Graph(model), "z")
    geometry = _gate_conv_geometry(Graph(model), layer)
    h2, z2, w2 = _as_2d(layer, h, z, w)
    rows = np.stack(np.unravel_index(np.arange(z2[:, 0].size), z2[:, 0].shape), axis=1)
    x = _patches(h2, rows, w2.shape[2:], geometry)
    np.testing.assert_allclose(x[:, :-1] @ w2.reshape(3, -1).T, z2.transpose(0, 2, 3, 1).reshape(-1, 3), atol=1e-5)


@pytest.mark.parametrize("strides", [(2, 2), (1, 2)])
@pytest.mark.parametrize("kernel", [(3, 3), (4,)], ids=["2-D", "1-D"])
def test_the_transform_refit_reads_a_strided_conv_as_ort_computes_it(kernel, strides):
    """A transform conv may be strided (the first block of a stage): patches taken at its output
    positions with its strides and explicit pads, times its weights, give ORT's conv output."""
    from hwtool.graph import Graph
    from hwtool.patterns import affine
    from hwtool.prune import _as_2d, _conv_geometry, _gate_conv_geometry, _patches

    rng = np.random.default_rng(1)
    h = rng.random((2, 3, *(9, 8)[-len(kernel) :]), dtype=np.float32)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    stride = list(strides[-len(kernel) :])
    model, z = _one_conv(h, w, pads=[1] * 2 * len(kernel), strides=stride)
    layer = affine(Graph(model), "z")
    pads, steps = _conv_geometry(Graph(model), layer)
    assert _gate_conv_geometry(Graph(model), layer) is None  # a gate conv stays stride 1
    h2, z2, w2 = _as_2d(layer, h, z, w)
    rows = np.stack(np.unravel_index(np.arange(z2[:, 0].size), z2[:, 0].shape), axis=1)
    x = _patches(h2, rows, w2.shape[2:], pads, tuple(steps))
    np.testing.assert_allclose(x[:, :-1] @ w2.reshape(4, -1).T, z2.transpose(0, 2, 3, 1).reshape(-1, 4), atol=1e-5)


def test_the_transform_refit_restores_what_pruning_upstream_moved(cifar):
    """Past the channels whose gates are off, a pruned block changes what the next blocks read;
    refitting their transforms to the unpruned response (the default) brings the output and the
    test accuracy back closer than refitting the kept gates alone, block by block as reported;
    a block whose input did not move is not refitted."""
    models = Path(__file__).resolve().parent.parent / "models"
    model = onnx.load(models / "small-gated.onnx")
    x = np.load(models / "calib256.npy")
    test = cifar["test"].head(1000)
    from hwtool.evaluate import accuracy_onnx

    both, full = prune(model, 0.02, calib=x)
    gates, only = prune(model, 0.02, calib=x, config=PruneConfig(refit_transforms=False))
    assert [b.kept for b in full.blocks] == [b.kept for b in only.blocks]
    assert full.max_abs_error < only.max_abs_error and full.top1_agreement > only.top1_agreement
    assert accuracy_onnx(both, test)[0] > accuracy_onnx(gates, test)[0]
    assert all(b.transform_error_naive is None for b in only.blocks)
    first = next(i for i, b in enumerate(full.blocks) if b.kept < b.width)
    assert all(b.transform_error_naive is None for b in full.blocks[: first + 1])  # nothing moved yet
    refitted = [b for b in full.blocks[first + 1 :] if b.transform_error_naive is not None]
    assert refitted and all(b.transform_error_refit < b.transform_error_naive for b in refitted)
    # where a stage begins, the carry is a strided 1x1 projection of the moved input: refitted too
    projected = [b for b in full.blocks if b.carry_error_naive is not None]
    assert projected and all(b.carry_error_refit < b.carry_error_naive for b in projected)
    assert all(b.carry_error_naive is None for b in full.blocks[: first + 1])
    assert count_parameters(both) == count_parameters(gates)  # the refits add no bias


def test_round_to_fills_up_with_the_highest_gates():
    from hwtool.prune import kept_channels

    means = np.array([0.9, 0.01, 0.3, 0.02, 0.5, 0.04, 0.0, 0.03])
    assert kept_channels(means, 0.05).tolist() == [0, 2, 4]
    assert kept_channels(means, 0.05, round_to=4).tolist() == [0, 2, 4, 5]
    assert kept_channels(means, 0.05, round_to=16).tolist() == list(range(8))  # capped at the width
    assert kept_channels(means, 0.95, round_to=4).tolist() == []  # an empty block stays empty


def test_cli_round_to(tmp_path):
    src = _save(build(Spec(removable=REMOVABLE)), tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", images(8))
    res = _cli(
        ["prune", src, "--threshold", "0.000001", "--calib", tmp_path / "calib.npy", "--round-to", "4", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert [b["kept"] for b in json.loads(res.output)["blocks"]] == [8, 0, 8]


def test_python_api_takes_the_threshold_from_the_config_unless_given_and_as_numpy_scalars():
    """PruneConfig(threshold=t) is the threshold unless prune() is given one (the argument's default
    0.05 always won over the config's); a numpy scalar is taken as a float, so the report is JSON."""
    from hwtool.runtime import json_text

    model, x = build(Spec(removable=REMOVABLE)), images(8)
    everything = PruneConfig(threshold=1.0, simplify=False)
    assert prune(model, calib=x, config=everything)[1].threshold == 1.0
    assert prune(model, 1e-6, calib=x, config=everything)[1].threshold == 1e-6
    _, report = prune(model, np.float32(1e-6), calib=x)
    assert type(report.threshold) is float and [b.kept for b in report.blocks] == [5, 0, 7]
    assert json.loads(json_text(report.to_dict()))["threshold"] == pytest.approx(1e-6)
    _, report = prune(model, calib=x, budget=np.float64(0.5))
    assert json.loads(json_text(report.to_dict()))["budget"] == 0.5


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("ridge", float("nan"), "PruneConfig.ridge is nan"),  # it returned a model of NaN outputs
        ("ridge", -1.0, "PruneConfig.ridge is -1.0"),
        ("refit_images", 0, "PruneConfig.refit_images is 0"),
        ("batch", 0, "PruneConfig.batch is 0"),
        ("max_rows", 0, "PruneConfig.max_rows is 0"),
        ("round_to", 0, "PruneConfig.round_to is 0"),
        ("threads", -2, "PruneConfig.threads is -2"),
        ("threshold", -1.0, "threshold -1.0 is outside [0, 1]"),
        ("threshold", float("nan"), "PruneConfig.threshold is nan"),
        ("threshold", "0.05", "PruneConfig.threshold must be a number, not str"),
        ("budget", 0.0, "budget 0.0 is not a fraction"),
        ("write_back", "nope", "write-back must be one of"),
    ],
)
def test_a_prune_config_refuses_values_that_would_prune_wrongly(field, value, error):
    with pytest.raises((ValueError, TypeError), match=re.escape(error)):
        PruneConfig(**{field: value})


@pytest.mark.parametrize(
    "calib,error",
    [
        ((images(8) * 255).astype(np.uint8), "is uint8; expected float32"),  # it pruned on pixel values 0..255
        ({"input": images(8), "extra": images(8)}, "the model's inputs are ['input']"),
        (images(8)[0], "has shape [3, 32, 32]"),
        ([[0.0]], "must be a numpy array"),
    ],
    ids=["uint8 pixels", "an extra name", "no batch axis", "a list"],
)
def test_python_api_checks_calibration_arrays_as_the_command_checks_files(calib, error):
    model = build(Spec(removable=REMOVABLE))
    with pytest.raises((ValueError, TypeError), match=re.escape(error)):
        prune(model, 0.05, calib=calib)
    with pytest.raises(TypeError, match="config must be a PruneConfig, not dict"):
        prune(model, 0.05, calib=images(8), config={"threshold": 0.05})
    with pytest.raises(TypeError, match="an onnx.ModelProto or a path, not int"):
        prune(3, 0.05, calib=images(8))
    # float64, numpy's default, is taken as float32
    assert prune(model, 1e-6, calib=images(8).astype(np.float64))[1].blocks[0].kept == 5


def test_python_api_takes_a_path(tmp_path):
    import hwtool

    src = _save(build(Spec(removable=REMOVABLE)), tmp_path / "net.onnx")
    pruned, report = hwtool.prune(str(src), 1e-6, calib=images(8))
    assert isinstance(pruned, onnx.ModelProto)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    import hwtool.prune as module  # the submodule import must not break the call

    assert hwtool.prune(src, 1e-6, calib=images(8))[1].params_after == report.params_after
    assert module.PruneConfig().threshold == 0.05
    import inspect

    assert list(inspect.signature(hwtool.prune).parameters)[:4] == ["model_or_path", "threshold", "calib", "config"]


def test_onnxsim_is_imported_without_torch_and_torch_still_imports_after():
    # hwtool hides torch and sympy while onnxsim is imported (a second of startup); the hiding
    # must not outlive the import, or `import torch` would fail for the rest of the process
    pytest.importorskip("torch")
    code = (
        "import sys; from hwtool.respell import _import_onnxsim; m = _import_onnxsim(); "
        "assert callable(m.simplify); assert 'torch' not in sys.modules and 'sympy' not in sys.modules; "
        "import sympy, torch; print(torch.tensor([1.0]).sum().item())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1.0"


def test_report_tables_fit_80_columns_without_cutting_numbers():
    from dataclasses import replace

    from hwtool.report import prune_tables

    _, report = prune(build(Spec(removable=REMOVABLE)), threshold=1e-6, calib=images(16))
    note = "left whole: H, T, the gate pre-activation or the mix is read outside the block"
    big = [replace(b, params_before=1_180_160 + b.index, note=note if b.kept == 0 else "") for b in report.blocks]
    for blocks in (big, [replace(big[0], spelling="c + t*(h-c)"), *big[1:]]):
        text = render(*prune_tables(replace(report, blocks=blocks)))
        for b in blocks:  # every figure whole, on one line
            assert f"{b.params_before:,}" in text and f"{b.params_after:,}" in text
        for stage in report.seconds:
            assert stage in text
        assert " ".join(f"block 1: {note}".split()) in " ".join(text.split())  # the note, whole
    # Two spellings: a letter per block, each spelled out once below the table.
    assert "mix a: c + t*(h-c); b: h*t + (1-t)*c" in text


BUDGET_SPECS = {
    "gate reads H": Spec(),
    "BN after the transform conv": Spec(bn_after=True, bn_before=False),
    "PRelu": Spec(activation="PRelu"),
    "gate reads the input": Spec(gate_reads="input"),
    "depthwise gate": Spec(gate_depthwise=True),
}


@pytest.mark.parametrize("spec", BUDGET_SPECS.values(), ids=BUDGET_SPECS.keys())
def test_a_budget_is_met_at_the_lowest_gate_level_that_meets_it(spec):
    """For every kind of gate and per-channel post node, at budgets that take a few channels, most,
    or whole blocks: the pruned model keeps at most the budget, the threshold is a gate level, and
    the level below it would keep more."""
    from hwtool.gates import measure_gates
    from hwtool.prune import gate_levels
    from hwtool.respell import highway_model

    model = build(spec)
    x = images(16)
    stats, _ = measure_gates(*highway_model(model), x)
    levels = gate_levels(stats.means)
    total = count_parameters(model)
    for budget in (0.9, 0.5, 0.2):
        pruned, report = prune(model, calib=x, config=PruneConfig(budget=budget))
        assert report.budget == budget and report.params_after == count_parameters(pruned) <= budget * total
        i = levels.index(report.threshold)
        assert i > 0
        _, lower = prune(model, levels[i - 1], calib=x, config=PruneConfig(refit=False))
        assert lower.params_after > budget * total, (budget, report.threshold)
    assert any(b.kept == 0 for b in report.blocks)  # 20% takes whole blocks
    _, same = prune(model, calib=x, budget=0.2)  # the keyword, as from `hwtool.prune(..., budget=...)`
    assert (same.threshold, same.params_after, same.budget) == (report.threshold, report.params_after, 0.2)
    with pytest.raises(ValueError, match="cannot be met"):
        prune(model, calib=x, config=PruneConfig(budget=0.001))


def test_cli_budget_picks_the_lowest_threshold_that_fits(tmp_path):
    """--budget F: the pruned model keeps at most F of the parameters, at the lowest gate level
    that does (one level lower does not fit), named as the threshold; bad budgets are one-line
    errors that write nothing."""
    from hwtool.gates import measure_gates
    from hwtool.respell import highway_model

    models = Path(__file__).resolve().parent.parent / "models"
    src, calib = models / "small-gated.onnx", models / "calib256.npy"
    x = np.load(calib)
    model = onnx.load(src)
    stats, _ = measure_gates(*highway_model(model), x)
    levels = np.unique(np.concatenate(stats.means))
    for budget in (0.6, 0.25):
        out = tmp_path / f"b{budget}.onnx"
        res = _cli(["prune", src, "--budget", budget, "--calib", calib, "-o", out, "--json"])
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)
        assert got["budget"] == budget and got["params_after"] <= budget * got["params_before"]
        assert got["params_after"] == count_parameters(onnx.load(out))
        t = got["threshold"]
        assert t in levels and t > levels[0]  # a gate level: the lowest kept channel's mean
        lower = levels[np.searchsorted(levels, t) - 1]
        _, one_less = prune(model, lower, calib=x, config=PruneConfig(refit=False))
        assert one_less.params_after > budget * got["params_before"]
    res = _cli(["prune", src, "--budget", "0.25", "--calib", calib, "-o", tmp_path / "t.onnx"])
    assert "threshold 0.02" in res.stdout and "for a budget of 25.0% of the" in res.stdout

    bad = {
        ("--budget", "0.2", "--threshold", "0.05"): "pass either --threshold or --budget, not both",
        ("--budget", "0"): "--budget 0.0 is not a fraction in (0, 1]",
        ("--budget", "1.5"): "--budget 1.5 is not a fraction in (0, 1]",
        ("--budget", "0.001"): "a budget of 0.1% of the parameters cannot be met: removing every transform",
    }
    for args, needle in bad.items():
        res = _cli(["prune", src, *args, "--calib", calib, "-o", tmp_path / "bad.onnx"])
        assert needle in one_line_error(res), args
    assert not (tmp_path / "bad.onnx").exists()


def test_cli_refit_gates_only(tmp_path):
    models = Path(__file__).resolve().parent.parent / "models"
    src, calib = models / "small-gated.onnx", models / "calib256.npy"
    runs = {}
    for flag in ([], ["--refit-gates-only"]):
        res = _cli(["prune", src, "--threshold", "0.02", "--calib", calib, "-o", tmp_path / "p.onnx", "--json", *flag])
        assert res.exit_code == 0, res.output
        runs[bool(flag)] = json.loads(res.stdout)
    assert all(b["transform_error_naive"] is None for b in runs[True]["blocks"])
    assert any(b["transform_error_naive"] is not None for b in runs[False]["blocks"])
    assert runs[False]["max_abs_error"] < runs[True]["max_abs_error"]
    moved = [b for b in runs[False]["blocks"] if b["transform_error_naive"] is not None]
    res = _cli(["prune", src, "--threshold", "0.02", "--calib", calib, "-o", tmp_path / "p.onnx"])
    projected = sum(b["carry_error_naive"] is not None for b in runs[False]["blocks"])
    text = " ".join(res.stdout.split())
    assert f"transforms refitted in {len(moved)} blocks whose input pruning moved (and {projected} carry" in text
    res = _cli(["prune", src, "--no-refit", "--refit-gates-only", "-o", tmp_path / "q.onnx"])
    assert "pass either --no-refit or --refit-gates-only" in one_line_error(res)
    assert not (tmp_path / "q.onnx").exists()


def test_the_refit_takes_fewer_samples_where_activations_are_large():
    """The refit holds activations of every calibration sample it uses, for two networks: where a
    block's activations are large it takes fewer samples (at least one), says how many, and the
    prune stays exact on switched-off channels and still refits live ones."""
    from hwtool.prune import REFIT_HELD, refit_samples
    from hwtool.report import prune_tables
    from hwtool.respell import highway_model
    from hwtool.runtime import make_session

    model = build(Spec(removable=REMOVABLE))
    x = images(48)
    original, blocks = highway_model(model)
    assert refit_samples(original, blocks, x, PruneConfig()) == 48
    # the largest H or carry, as ORT computes it for one image
    names = [t for b in blocks for t in (b.transform, b.carry)]
    sess = make_session(original, extra_outputs=names)
    largest = max(a.size for a in sess.run(names, {sess.get_inputs()[0].name: x[:1]}))
    per_sample = largest * 4 * REFIT_HELD
    small = PruneConfig(refit_memory=10 * per_sample)
    assert refit_samples(original, blocks, x, small) == 10
    assert refit_samples(original, blocks, x, PruneConfig(refit_memory=1)) == 1
    pruned, report = prune(model, 1e-6, calib=x, config=small)
    assert report.refit_samples == 10 and report.max_abs_error < 1e-4
    _, plain = prune(model, 0.3, calib=x, config=PruneConfig(refit=False))
    _, capped = prune(model, 0.3, calib=x, config=small)
    assert plain.refit_samples == 0 and capped.refit_samples == 10
    assert any(b.gate_error_refit < b.gate_error_naive for b in capped.blocks if b.gate_error_naive)
    text = " ".join(render(*prune_tables(report)).split())
    assert "refit on the first 10 of 48 calibration samples" in text


def test_a_gate_pre_activation_read_outside_its_block_leaves_the_block_whole():
    """Pruning narrows the gate conv's output with T: a graph output or another node reading it
    would break, so the block stays whole and the network computes what it did."""
    from onnx import helper

    x = images(16)
    base = build(Spec(removable=REMOVABLE_DEFAULT))
    pre = find_blocks(base)[0].gate_conv
    as_output = onnx.ModelProto()
    as_output.CopyFrom(base)
    as_output.graph.output.append(helper.make_tensor_value_info(pre, onnx.TensorProto.FLOAT, ["N", 8, 32, 32]))
    read = onnx.ModelProto()
    read.CopyFrom(base)
    logits = read.graph.output[0].name
    next(n for n in read.graph.node if logits in n.output).output[0] = "logits_before"
    read.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    read.graph.node.extend(
        [
            helper.make_node("ReduceMean", [pre], ["pre_mean"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Unsqueeze", ["pre_mean", "axis1"], ["pre_col"]),
            helper.make_node("Add", ["logits_before", "pre_col"], [logits]),
        ]
    )
    for model in (as_output, read):
        onnx.checker.check_model(model, full_check=True)
        pruned, report = prune(model, 0.05, calib=x)
        assert report.blocks[0].kept == 8 and report.blocks[2].kept < 12  # the others still pruned
        onnx.checker.check_model(pruned, full_check=True)
        np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-5)


@pytest.mark.parametrize("write_back", ["gather", "scatter"])
def test_a_pruned_model_prunes_again(write_back):
    """Its blocks are found again (their carries now run through the first surgery's Gather): the
    second surgery names what it adds apart from the first's."""
    x = images(16)
    model = build(Spec(removable={0: [1, 4], 1: [0, 1, 2], 2: [2, 3]}))
    once, first = prune(model, 0.05, calib=x, config=PruneConfig(write_back=write_back))
    twice, second = prune(once, 0.3, calib=x, config=PruneConfig(write_back=write_back))
    onnx.checker.check_model(twice, full_check=True)
    assert second.params_after < first.params_after
    assert second.max_abs_error == pytest.approx(float(np.abs(run(twice, x) - run(once, x)).max()), abs=1e-5)
    names = [n for node in twice.graph.node for n in node.output]
    assert len(names) == len(set(names))


def test_a_depthwise_gate_reading_the_block_input_reads_only_the_kept_channels():
    """T = Sigmoid(depthwise Conv(x)): each kept gate reads its own channel of x, so the narrowed
    conv is fed those channels alone; the removal of exactly-off channels stays exact."""
    from onnx import helper

    c, rng = 8, np.random.default_rng(0)
    wh, bh = rng.normal(0, 0.3, (c, c, 3, 3)).astype("float32"), rng.normal(0, 0.1, c).astype("float32")
    wt, bt = rng.normal(0, 0.3, (c, 1, 3, 3)).astype("float32"), rng.normal(-1, 0.5, c).astype("float32")
    wh[[1, 3]], bh[[1, 3]], wt[[1, 3]], bt[[1, 3]] = 0, 0, 0, -40
    nodes = [
        helper.make_node("Conv", ["x", "wh", "bh"], ["hc"], pads=[1] * 4),
        helper.make_node("Relu", ["hc"], ["h"]),
        helper.make_node("Conv", ["x", "wt", "bt"], ["tc"], pads=[1] * 4, group=c),
        helper.make_node("Sigmoid", ["tc"], ["t"]),
        helper.make_node("Sub", ["h", "x"], ["d"]),
        helper.make_node("Mul", ["t", "d"], ["td"]),
        helper.make_node("Add", ["x", "td"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", c, 8, 8]) for n in ("x", "y")]
    inits = [onnx.numpy_helper.from_array(v, n) for v, n in ((wh, "wh"), (bh, "bh"), (wt, "wt"), (bt, "bt"))]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (block,) = find_blocks(model)
    assert block.gate_depthwise and not block.gate_reads_transform
    x = rng.normal(size=(8, c, 8, 8)).astype("float32")
    pruned, report = prune(model, 1e-6, calib=x)
    assert report.blocks[0].kept == 6
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-5)


def test_a_prelu_slope_in_any_broadcastable_shape_is_sliced_on_its_channel_axis():
    model = build(Spec(removable=REMOVABLE_DEFAULT, activation="PRelu"))
    for node in (n for n in model.graph.node if n.op_type == "PRelu"):
        t = next(t for t in model.graph.initializer if t.name == node.input[1])
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).reshape(1, -1, 1, 1), t.name))
    onnx.checker.check_model(model, full_check=True)
    x = images(16)
    pruned, report = prune(model, 1e-6, calib=x)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-5)


def test_a_fixed_batch_model_is_refitted_on_whole_batches_and_counted_per_sample():
    """Batch fixed at 3 inside the graph too (a Reshape to [3, ...] after the stem, as some exports
    write it): the refit runs whole batches, and FLOPs are per sample as for a dynamic batch."""
    from onnx import helper

    model = build(Spec(removable=REMOVABLE_DEFAULT, batch=3))
    stem = find_blocks(model)[0].carry
    for node in model.graph.node:
        node.input[:] = ["stem_fixed" if i == stem else i for i in node.input]
    at = next(i for i, n in enumerate(model.graph.node) if stem in n.output)
    model.graph.node.insert(at + 1, helper.make_node("Reshape", [stem, "stem_shape"], ["stem_fixed"]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([3, 8, 32, 32], np.int64), "stem_shape"))
    onnx.checker.check_model(model, full_check=True)
    x = images(6)
    _, dynamic = prune(build(Spec(removable=REMOVABLE_DEFAULT)), 1e-6, calib=x)
    for refit_images in (4, 6):
        pruned, report = prune(model, 1e-6, calib=x, config=PruneConfig(refit_images=refit_images))
        assert report.refit_samples in (3, 6) and report.max_abs_error < 1e-4
        assert (report.flops_before, report.flops_after) == (dynamic.flops_before, dynamic.flops_after)


def test_initializers_listed_as_graph_inputs_go_with_their_initializers():
    """Exports with keep_initializers_as_inputs list every weight as a graph input too: the weights
    the surgery drops must leave the inputs as well, or the pruned model asks to be fed them."""
    from onnx import helper

    model = build(Spec(removable=REMOVABLE_DEFAULT))
    weights = model.graph.initializer
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights)
    onnx.checker.check_model(model, full_check=True)
    x = images(16)
    for simplify in (False, True):
        pruned, _ = prune(model, 1e-6, calib=x, config=PruneConfig(simplify=simplify))
        weights = {t.name for t in pruned.graph.initializer}
        assert [i.name for i in pruned.graph.input if i.name not in weights] == ["input"]
        np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-5)


def test_a_gate_conv_without_a_bias_gets_none_unless_refit():
    """A gate conv exported without a bias gained an all-zero bias input when pruned without the
    refit (the refit, which fits a bias, still gives it one)."""
    model = build(Spec(seed=3))
    gate_convs = [n for n in model.graph.node if n.op_type == "Conv" and "gate" in n.name.lower()]
    if not gate_convs:  # named otherwise: the convs feeding the gate activations
        sig = {n.input[0] for n in model.graph.node if n.op_type == "Sigmoid"}
        gate_convs = [n for n in model.graph.node if n.op_type == "Conv" and n.output[0] in sig]
    assert gate_convs
    for n in gate_convs:
        del n.input[2]
    x = images(32)
    ref = run(model, x)
    pruned, rep = prune(model, 0.3, calib=x, config=PruneConfig(refit=False))
    assert any(0 < b.kept < b.width for b in rep.blocks)
    inits = {i.name for i in pruned.graph.initializer}
    sig = {n.input[0] for n in pruned.graph.node if n.op_type == "Sigmoid"}
    convs = [n for n in pruned.graph.node if n.op_type == "Conv" and n.output[0] in sig]
    assert convs and all(len(n.input) == 2 for n in convs)
    assert all(n.input[1] in inits for n in convs)
    assert run(pruned, x).shape == ref.shape
    refit, _ = prune(model, 0.3, calib=x)
    sig = {n.input[0] for n in refit.graph.node if n.op_type == "Sigmoid"}
    assert any(len(n.input) == 3 for n in refit.graph.node if n.op_type == "Conv" and n.output[0] in sig)


def test_a_model_calling_local_functions_is_refit():
    """A model whose nodes call ONNX local functions (torch's export_modules_as_functions) runs in
    ONNX Runtime, but the refit's segment models left the functions out: prune failed with
    "ONNX Runtime cannot load the model"."""
    model = build(Spec(seed=3))
    sub, div = model.graph.node[0], model.graph.node[1]
    assert (sub.op_type, div.op_type) == ("Sub", "Div")
    body = [
        onnx.helper.make_node("Sub", ["x", "m"], ["c"]),
        onnx.helper.make_node("Div", ["c", "s"], ["y"]),
    ]
    norm = onnx.helper.make_function(
        "local", "Normalise", ["x", "m", "s"], ["y"], body, [onnx.helper.make_opsetid("", 17)]
    )
    reads = [sub.input[0], sub.input[1], div.input[1]]
    call = onnx.helper.make_node("Normalise", reads, [div.output[0]], domain="local")
    del model.graph.node[:2]
    model.graph.node.insert(0, call)
    model.functions.append(norm)
    model.opset_import.append(onnx.helper.make_opsetid("local", 1))
    onnx.checker.check_model(model)
    x = images(32)
    ref = run(model, x)
    pruned, rep = prune(model, 0.3, calib=x)
    assert any(0 < b.kept < b.width for b in rep.blocks)
    assert any(b.gate_error_refit is not None for b in rep.blocks)  # the refit ran
    # ... as it runs on the same network written without the function
    inline, inline_rep = prune(build(Spec(seed=3)), 0.3, calib=x)
    np.testing.assert_allclose(run(pruned, x), run(inline, x), atol=1e-5)
    assert rep.max_abs_error == pytest.approx(float(np.abs(run(pruned, x) - ref).max()), rel=1e-3, abs=1e-7)
    assert [b.kept for b in rep.blocks] == [b.kept for b in inline_rep.blocks]


def test_a_model_that_fails_the_checker_itself_is_named_as_the_fault(tmp_path):
    """An extra graph output without a type runs in ONNX Runtime but fails onnx.checker, and so did
    the pruned copy: the error blamed "a block spelling hwtool mishandles"."""
    model = build(Spec(seed=3))
    t = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    model.graph.output.append(onnx.ValueInfoProto(name=t))
    x = images(16)
    run(model, x)  # ONNX Runtime runs it
    with pytest.raises(Exception, match="the model fails ONNX's checker .* fix the model"):
        prune(model, 0.3, calib=x)


@pytest.mark.parametrize(
    "op,scalar_first", [("Add", False), ("Sub", False), ("Sub", True), ("Mul", True), ("Div", False)]
)
def test_a_gate_with_its_own_offset_or_temperature_is_folded_and_pruned(op, scalar_first):
    """T = Sigmoid(Conv(H) + b), Sigmoid(Conv(H) / τ), ...: a scalar between the gate layer and its
    sigmoid (a gate offset of its own, a temperature) hid every block ("no highway block found");
    folded into the layer, the blocks are found and pruned, and the prune of dead channels is exact."""
    model = build(Spec(removable=REMOVABLE))
    value = {"Add": -0.5, "Sub": 0.25, "Mul": 1.5, "Div": 2.0}[op]
    if op == "Sub" and scalar_first:
        value = 0.0  # c - z with c = 0: the gate's sign flips, so flip the layer back to keep dead gates dead
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), "scalar"))
    sigmoids = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    inits = {t.name: t for t in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    for i, sig in enumerate(sigmoids):
        z = sig.input[0]
        if op == "Sub" and scalar_first:  # Sigmoid(0 - Conv'(H)) with Conv' = -Conv: the same gates
            conv = producer[z]
            for k in (1, 2):
                t = inits[conv.input[k]]
                t.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(t), t.name))
        elif op == "Add":  # the offset given back by the conv's bias: the same gates
            t = inits[producer[z].input[2]]
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) + 0.5, t.name))
        args = ["scalar", z] if scalar_first else [z, "scalar"]
        model.graph.node.insert(list(model.graph.node).index(sig), onnx.helper.make_node(op, args, [f"z{i}"]))
        sig.input[0] = f"z{i}"
    x = images(24)
    with pytest.raises(NoHighwayBlockError):
        find_blocks(model)
    pruned, report = prune(model, threshold=1e-6, calib=x)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)
    assert not any(n.op_type == op and "scalar" in n.input for n in pruned.graph.node)


def test_a_gate_offset_then_a_temperature_are_folded_both():
    """Sigmoid((Conv(H) + b) / τ): two folds into one layer, each under names of its own."""
    model = build(Spec(removable=REMOVABLE))
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((0.5, "offset"), (2.0, "tau"))
    )
    for i, sig in enumerate([n for n in model.graph.node if n.op_type == "Sigmoid"]):
        at = list(model.graph.node).index(sig)
        model.graph.node.insert(at, onnx.helper.make_node("Div", [f"o{i}", "tau"], [f"z{i}"]))
        model.graph.node.insert(at, onnx.helper.make_node("Add", [sig.input[0], "offset"], [f"o{i}"]))
        sig.input[0] = f"z{i}"
    x = images(24)
    pruned, report = prune(model, threshold=1e-6, calib=x)
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.kept for b in report.blocks] == [5, 0, 7]
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-4)


def test_a_gate_divided_into_a_scalar_is_not_folded():
    """c / Conv(H) is not a layer of H: nothing to fold, no block found."""
    model = build(Spec())
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "scalar"))
    for i, sig in enumerate([n for n in model.graph.node if n.op_type == "Sigmoid"]):
        div = onnx.helper.make_node("Div", ["scalar", sig.input[0]], [f"z{i}"])
        model.graph.node.insert(list(model.graph.node).index(sig), div)
        sig.input[0] = f"z{i}"
    with pytest.raises(NoHighwayBlockError):
        prune(model, 0.3, calib=images(8))


def test_pruning_again_after_the_conv_write_back_says_what_it_cannot_find():
    """The conv write-back's one-hot layers stand in the pruned blocks' mix, so a second prune found
    only the blocks left whole, renumbered from 0, and said nothing."""
    x = images(16)
    model = build(Spec(removable={0: [1, 4]}))
    once, first = prune(model, 1e-6, calib=x, config=PruneConfig(write_back="conv"))
    assert [b.kept for b in first.blocks] == [6, 8, 12]
    with pytest.warns(UserWarning, match="pruned before with the conv write-back.*only the blocks it left whole"):
        _, second = prune(once, 0.3, calib=x)
    assert len(second.blocks) == 2
    every = build(Spec(removable={0: [1, 4], 1: [0, 1, 2], 2: [2, 3]}))
    every, _ = prune(every, 1e-6, calib=x, config=PruneConfig(write_back="conv"))  # part of each block goes
    with pytest.raises(NoHighwayBlockError, match="conv write-back.*no block is left to find"):
        prune(every, 0.3, calib=x)
    # gates and sweep, which find blocks the same way, say so too (they gave "is this a highway network?")
    from hwtool.gates import measure_gates
    from hwtool.respell import highway_model

    with pytest.raises(NoHighwayBlockError, match="no block is left to find"):
        highway_model(every)
    with pytest.warns(UserWarning, match="only the blocks it left whole"):
        _, blocks = highway_model(once)
    assert len(measure_gates(once, blocks, x)[0].means) == 2
    gathered, _ = prune(model, 1e-6, calib=x, config=PruneConfig(write_back="gather"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(gathered, 0.3, calib=x)


def test_the_python_api_refuses_a_threshold_and_a_budget_together_and_non_bool_switches():
    """prune(m, 0.05, budget=0.5) pruned to the budget and dropped the 0.05 without a word (the
    CLI refuses both); PruneConfig(refit="no") refitted."""
    model, x = build(Spec(seed=3)), images(16)
    for kw in ({"budget": 0.5}, {"config": PruneConfig(budget=0.5)}):
        with pytest.raises(ValueError, match="a threshold or a budget, not both"):
            prune(model, 0.05, calib=x, **kw)
    _, rep = prune(model, calib=x, config=PruneConfig(threshold=0.3, budget=0.5))  # the config's budget rules
    assert rep.budget == 0.5 and rep.params_after <= 0.5 * rep.params_before
    for name in ("refit", "refit_transforms", "simplify"):
        with pytest.raises(TypeError, match=f"PruneConfig.{name} must be True or False"):
            PruneConfig(**{name: "no"})
    assert PruneConfig(refit=np.bool_(False)).refit is False


def test_a_warning_of_hwtool_prune_names_the_callers_line():
    """Through the callable module (hwtool.prune(...)) the warning was put on hwtool's own line."""
    import hwtool

    with pytest.warns(UserWarning, match="calibration samples") as caught:
        hwtool.prune(build(Spec(seed=3)), 0.3, calib=images(4))
    assert caught[0].filename == __file__


def test_a_temperature_folded_into_a_gate_without_a_bias_adds_none():
    """Folding only scaled the weights, yet the gate layer gained a zero bias of its own."""
    from hwtool.respell import fold_gate_scalars

    model = build(Spec(seed=3))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "tau"))
    for i, sig in enumerate([n for n in model.graph.node if n.op_type == "Sigmoid"]):
        conv = next(n for n in model.graph.node if n.output[0] == sig.input[0])
        del conv.input[2]
        model.graph.node.insert(
            list(model.graph.node).index(sig), onnx.helper.make_node("Div", [sig.input[0], "tau"], [f"z{i}"])
        )
        sig.input[0] = f"z{i}"
    folded = fold_gate_scalars(model)
    gates = [
        n
        for n in folded.graph.node
        if n.op_type == "Conv" and any(u.op_type == "Sigmoid" and u.input[0] == n.output[0] for u in folded.graph.node)
    ]
    assert len(gates) == 3 and all(len(n.input) == 2 for n in gates)
    x = images(8)
    np.testing.assert_allclose(run(folded, x), run(model, x), atol=1e-5)


def _with_gate_metadata(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    """The model with its gate means in metadata, as `hwtool export` stores them."""
    from hwtool.gates import GATE_METADATA, measure_gates

    stats, _ = measure_gates(model, find_blocks(model), x)
    stored = {"images": len(x), "blocks": [m.tolist() for m in stats.means]}
    model.metadata_props.add(key=GATE_METADATA, value=json.dumps(stored))
    return model


def _meta(model: onnx.ModelProto, key: str):
    value = {p.key: p.value for p in model.metadata_props}.get(key)
    return None if value is None else json.loads(value)


@pytest.mark.parametrize("refit", [True, False], ids=["refit", "plain"])
def test_a_pruned_model_carries_its_own_gate_means_and_how_it_was_pruned(refit):
    """The pruned model's metadata holds the gate means of the blocks it has (measured on it, so
    that `gates` and a second prune run on it with no data) instead of the full-width means that
    no longer match any block, and a record of the prune."""
    from hwtool.gates import gates_from_metadata, measure_gates

    x = images(24)
    model = _with_gate_metadata(build(Spec(removable=REMOVABLE)), x)
    pruned, report = prune(model, threshold=1e-6, calib=x, config=PruneConfig(refit=refit))
    blocks = find_blocks(pruned)
    assert [b.width for b in blocks] == [5, 7]  # block 1 kept nothing: it is gone
    stored = gates_from_metadata(pruned, blocks)
    assert stored is not None and "the pruned model on 24 calibration inputs" in stored.source
    measured, _ = measure_gates(pruned, blocks, x)
    for got, want in zip(stored.means, measured.means):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    (record,) = _meta(pruned, "hwtool.prune")
    assert record["threshold"] == 1e-6 and record["kept"] == [[5, 8], [0, 8], [7, 12]]
    assert record["refit"] == ("transforms and gates" if refit else "none")
    assert (record["params_before"], record["params_after"]) == (report.params_before, report.params_after)
    again, second = prune(pruned, threshold=0.2, config=PruneConfig(refit=False))  # from metadata alone
    assert second.gate_source.startswith("model metadata (hwtool prune")
    kept = [int((m >= 0.2).sum()) for m in measured.means]
    assert [b.kept for b in second.blocks] == kept
    sliced = gates_from_metadata(again, find_blocks(again))
    assert sliced.source == "model metadata (hwtool prune: the kept channels' means before pruning)"
    first, latest = _meta(again, "hwtool.prune")  # both prunes, oldest first
    assert first == record and (latest["threshold"], latest["params_before"]) == (0.2, report.params_after)
    for got, means in zip(sliced.means, [m for m in measured.means if (m >= 0.2).any()]):
        np.testing.assert_array_equal(got, means[means >= 0.2])


def test_gate_means_are_dropped_where_the_pruned_blocks_cannot_be_found_and_never_added():
    """A conv write-back hides the pruned blocks from a later search: no means are left that would
    describe no block. A model that carried none gets none, only the record of the prune."""
    x = images(24)
    model = _with_gate_metadata(build(Spec(removable=REMOVABLE)), x)
    hidden, _ = prune(model, threshold=1e-6, calib=x, config=PruneConfig(write_back="conv"))
    assert _meta(hidden, "hwtool.gate_means") is None and _meta(hidden, "hwtool.prune") is not None
    plain, _ = prune(build(Spec(removable=REMOVABLE)), threshold=1e-6, calib=x)
    assert _meta(plain, "hwtool.gate_means") is None
    assert _meta(plain, "hwtool.prune")[0]["kept"] == [[5, 8], [0, 8], [7, 12]]


def test_a_keras_highway_network_converted_by_tf2onnx_is_pruned_exactly():
    """tests/data/keras_highway.onnx (tests/data/make_keras_highway.py: Keras 3, tf2onnx, NHWC input,
    BatchNormalization as Mul and Add, hard_sigmoid gates spelled Add, Clip, Mul): its three blocks
    are found and the channels whose gates are shut removed exactly."""
    model = onnx.load(str(Path(__file__).parent / "data" / "keras_highway.onnx"))
    x = np.random.default_rng(0).random((32, 32, 32, 3), dtype=np.float32)  # NHWC, as Keras takes it
    pruned, report = prune(model, 1e-6, calib=x)
    assert [(b.width, b.kept) for b in report.blocks] == [(16, 13), (32, 27), (32, 27)]
    assert report.max_abs_error < 1e-5 and report.top1_agreement == 1.0
    assert report.params_after < report.params_before
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-5)


def test_a_keras_model_takes_cifar_images_in_its_own_layout(cifar, cifar_path, tmp_path):
    """A Keras model takes [N, 32, 32, 3]: --data gives it CIFAR-10 in that layout (it was refused
    as not [N, 3, 32, 32]), for eval and for the calibration of prune alike."""
    path = Path(__file__).parent / "data" / "keras_highway.onnx"
    model = onnx.load(str(path))
    test = cifar["test"].head(64)
    want = int((run(model, test.as_float().transpose(0, 2, 3, 1)).argmax(1) == test.labels).sum())
    res = _cli(["eval", path, "--data", cifar_path, "--limit", "64", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["correct"] == want
    # sizes left free, [N, h, w, c]: its first step, a Transpose from NHWC, says the layout
    for dim, free in zip(model.graph.input[0].type.tensor_type.shape.dim[1:], "hwc"):
        dim.dim_param = free
    onnx.save(model, str(tmp_path / "free.onnx"))
    res = _cli(["eval", tmp_path / "free.onnx", "--data", cifar_path, "--limit", "64", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["correct"] == want
    out = tmp_path / "pruned.onnx"
    res = _cli(["prune", path, "--data", cifar_path, "--count", "32", "--threshold", "1e-6", "-o", out, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert [b["kept"] for b in report["blocks"]] == [13, 27, 27] and report["max_abs_error"] < 1e-5


def test_a_block_left_whole_keeps_all_its_gate_means_in_the_pruned_metadata():
    """Pruned from metadata alone (no calibration), a block left whole (its H is also a graph
    output) keeps all its channels and so all its means: the kept channels' alone (5 of 8) made
    the metadata match no block, and `gates` and a second prune found no statistics."""
    from hwtool.gates import gates_from_metadata

    x = images(24)
    model = _with_gate_metadata(build(Spec(removable=REMOVABLE)), x)
    h0 = find_blocks(model)[0].transform
    model.graph.output.append(onnx.helper.make_tensor_value_info(h0, onnx.TensorProto.FLOAT, ["N", 8, 32, 32]))
    pruned, report = prune(model, 1e-6, config=PruneConfig(refit=False))
    assert [b.kept for b in report.blocks] == [8, 0, 7] and report.blocks[0].note.startswith("left whole")
    stored = gates_from_metadata(pruned, find_blocks(pruned))
    assert stored is not None and [len(m) for m in stored.means] == [8, 7]
